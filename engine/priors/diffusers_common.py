"""What the diffusers-based priors (Stable Diffusion, DeepFloyd IF) share, once their folder is found (hub.py).

- Loading a component with its name in any error ("unet: ..."), fp16 weight files where there are some.
- View-dependent prompts, their embeddings mixed by the camera's view weights, and a per-prompt cache.
- The U-Net as an `engine.sds.Denoiser` (one batched call for the branches a distillation asks for, Perp-Neg's
  included), and the guidance.

Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm"): besides the positive
(view-mixed) prompt, a render gets view prompts as negatives, and only the part of each negative direction
perpendicular to the positive one is removed:

    d_pos = eps(y_pos) - eps(y_u)            d_k = eps(y_k) - eps(y_u)
    d_k_perp = d_k - <d_k, d_pos> / max(|d_pos|^2, 1e-6) * d_pos
    eps_hat  = eps(y_u) + s * (d_pos - sum_k lambda_k * d_k_perp)

so a back view is pushed away from what makes a front view a front view (a face) without cancelling what the
two prompts share (the object). The weights lambda_k are the ones the paper's authors wrote into
stable-dreamfusion (`get_pos_neg_text_embeddings`, defaults negative_w = -2, front decay 2, side decay 10),
with threestudio's rule that overhead views (elevation > 60 degrees) get no negatives; see `perp_neg_weights`.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from engine.priors.hub import error_detail, local_variant
from engine.sds import VIEWS

VIEW_SUFFIXES = tuple(f", {v} view" for v in VIEWS)  # appended to the prompt, peers' style
TOKEN_LIMIT = 77  # CLIP's and IFPipeline's prompt length, used when a tokenizer states none


def view_prompts(prompt: str) -> list[str]:
    """The prompt once per view label, in VIEWS order."""
    return [prompt + s for s in VIEW_SUFFIXES]


def token_limit(tokenizer, positions: int | None = None) -> int:
    """The tokenizer's model_max_length, or 77 (at most the text encoder's positions) when it is missing or absurd:
    a tokenizer folder without it reports ~1e30 and padding to it fails."""
    n, cap = tokenizer.model_max_length, positions or TOKEN_LIMIT
    return n if isinstance(n, int) and 0 < n <= cap else min(TOKEN_LIMIT, cap)


def load_component(name: str, loader: Callable, folder: str, *, fp16: bool | None = None, **kwargs):
    """`loader(folder, subfolder=name, **kwargs)` with the component's name in any error; for weights (fp16 not
    None) the fp16 variant files are used where `local_variant` says so."""
    if fp16 is not None:
        kwargs["variant"] = local_variant(folder, name, fp16)
    try:
        return loader(folder, subfolder=name, **kwargs)
    except Exception as e:
        raise RuntimeError(f"{name}: could not be loaded from {folder}: {error_detail(e)}") from e


def check_width(component: str, expected: int | None, got: int, what: str) -> None:
    """Raise RuntimeError when two components disagree on a width (mixed checkpoints)."""
    if expected is not None and expected != got:
        raise RuntimeError(f"{component}: expects {what} of width {expected} but gets {got} "
                           "(components from different checkpoints?)")


@contextlib.contextmanager
def on_device(device, use: list[torch.nn.Module], park: list[torch.nn.Module] = ()):
    """Run `use` on `device` and leave it on the CPU afterwards; `park` waits on the CPU meanwhile and comes back.

    So a text encoder holds GPU memory only while it encodes a prompt, and with `park` (cpu_offload) it never
    shares the GPU with the U-Net: the peak is the larger of the two, not their sum.
    """
    for m in park:
        m.to("cpu")
    for m in use:
        m.to(device)
    try:
        yield
    finally:
        for m in use:
            m.to("cpu")
        for m in park:
            m.to(device)


# ---------------------------------------------------------------------------------------------------
# Prompts


class PromptCache:
    """The last few encoded (prompt, negative prompt) pairs, so switching back and forth costs nothing."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self.misses = 0  # encodings done; tests check a repeated prompt does not add one

    def get(self, key, make: Callable):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = self._items[key] = make()
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


def encode_views(prior, prompt: str, negative_prompt: str, max_length: int):
    """The prompt with each view suffix as cond [4, L, D], the negative prompt as uncond [1, L, D], the
    bare prompt as plain [1, L, D] (and "" as null when a negative prompt is set): one text-encoder batch per
    (prompt, negative prompt), through `prior._encode_texts` and `prior.cache` (Perp-Neg's negatives are the view
    prompts themselves)."""
    from engine.priors.base import PromptEmbedding

    def make() -> PromptEmbedding:
        extra = [""] if negative_prompt else []  # the empty prompt too (NFSD, ISM) when the negative is not it
        emb, truncated = prior._encode_texts(view_prompts(prompt) + [negative_prompt, prompt] + extra)
        warnings = [f"prompt longer than {max_length} tokens: truncated"] if truncated else []
        return PromptEmbedding(prompt, negative_prompt, cond=emb[:4], uncond=emb[4:5], warnings=warnings,
                               plain=emb[5:6], null=emb[6:7] if extra else None)

    return prior.cache.get((prompt, negative_prompt), make)


def text_batch(emb, view_weights: Tensor, view_dependent: bool = True) -> dict[str, Tensor]:
    """Per-render text [B, L, D] of each branch: "cond" (view-weighted mix, or the plain prompt when not
    view_dependent), "uncond" (the negative prompt) and "null" (the empty prompt; the very uncond tensor when no
    negative prompt is set, so a step asks the U-Net for it once)."""
    b = view_weights.shape[0]
    if view_dependent or emb.plain is None:
        cond = mix_views(emb.cond, view_weights)
    else:
        cond = emb.plain.expand(b, *emb.plain.shape[1:])
    uncond = emb.uncond.expand(b, *emb.uncond.shape[1:])
    return {"cond": cond, "uncond": uncond, "null": uncond if emb.null is None else emb.null.expand_as(uncond)}


def mix_views(cond: Tensor, view_weights: Tensor) -> Tensor:
    """Per-render embedding sum_v w_bv cond_v. cond [4, L, D], view_weights [B, 4] -> [B, L, D]."""
    w = view_weights.to(device=cond.device, dtype=cond.dtype)
    return torch.tensordot(w, cond, dims=([1], [0]))


def perp_neg_weights(azimuth_deg: Tensor, elevation_deg: Tensor, scale: float) -> Tensor:
    """Perp-Neg's lambda for the negatives (front, side, back) of each render, [B] x2 -> [B, 3].

    As stable-dreamfusion weights them (s = scale, its |negative_w|; azimuth 0 = front):
    1. Front half, |azimuth| < 90: r = 1 - |az|/90 (1 front, 0 side); the positive mixes front and side.
       "front" gets s e^(-2r), 0 when r > 0.8; "side" gets s e^(-10(1 - r)), 0 when r < 0.2.
    2. Back half: r = 2 - |az|/90 (1 side, 0 back). "front" gets s; "side" s/2 e^(-10r), 0 when r > 0.8.
    3. "back" is never a negative; overhead views (elevation > 60, threestudio's threshold) get none.
    Weights under 1e-4 are 0, as stable-dreamfusion skips them, so they cost no U-Net branch.
    """
    a = (torch.remainder(azimuth_deg.float() + 180.0, 360.0) - 180.0).abs()
    front_half = a < 90.0
    r = torch.where(front_half, 1.0 - a / 90.0, 2.0 - a / 90.0)
    zero = torch.zeros_like(r)
    front = torch.where(front_half, torch.where(r > 0.8, zero, scale * torch.exp(-2.0 * r)), zero + scale)
    side = torch.where(front_half, torch.where(r < 0.2, zero, scale * torch.exp(-10.0 * (1.0 - r))),
                       torch.where(r > 0.8, zero, 0.5 * scale * torch.exp(-10.0 * r)))
    w = torch.stack([front, side, zero], dim=-1) * (elevation_deg.float() <= 60.0)[:, None]
    return torch.where(w > 1e-4, w, torch.zeros_like(w))


def perp_neg_branches(emb, ctx, scale: float, device) -> tuple[Tensor, Tensor, Tensor] | None:
    """The U-Net branches Perp-Neg needs: (neg_emb [M, L, D], render index [M], lambda [M]) for the M
    (render, negative) pairs of nonzero weight, or None when there are none (pure CFG is then the same)."""
    if not ctx.view_dependent:
        return None  # Perp-Neg's negatives are the view prompts: off with view-dependent prompting
    if ctx.cameras is None:
        raise ValueError("Perp-Neg needs the cameras' azimuth and elevation (SDSContext.cameras)")
    w = perp_neg_weights(ctx.cameras.azimuth, ctx.cameras.elevation, scale).to(device)  # [B, 3]
    b, k = w.nonzero(as_tuple=True)
    if b.numel() == 0:
        return None
    return emb.cond[k.to(emb.cond.device)], b, w[b, k]


# ---------------------------------------------------------------------------------------------------
# Noise prediction and guidance


def denoiser(prior, x0: Tensor, texts: dict[str, Tensor], neg, vsd=None, channels: int | None = None
             ) -> tuple:
    """`engine.sds.Denoiser` of a diffusers U-Net prior (SD latents or IF pixels x0 [B, C, h, w]).

    Each `eps` call is one batched U-Net call over the branches asked for (texts from `text_batch`; Perp-Neg's
    (render, view) negatives from `perp_neg_branches` join whenever "cond" is asked, under "perp"), without a
    graph. channels: keep the first `channels` outputs (IF predicts noise and variance: 6 -> 3); v-prediction
    (SD 2.x-768) is converted to eps. Returns the Denoiser and the list of U-Net batch sizes it runs.
    """
    from engine.sds import Denoiser

    unet, dtype, abar_all = prior.unet, prior.dtype, prior.alphas_cumprod
    v_prediction = getattr(prior, "v_prediction", False)
    rows: list[int] = []

    def as_eps(out: Tensor, z: Tensor, t: Tensor) -> Tensor:
        out = out[:, :channels] if channels is not None else out
        return v_to_eps(out, z, abar_all[t]) if v_prediction else out.float()

    def eps(z_t: Tensor, t: Tensor, branches: tuple[str, ...]) -> dict[str, Tensor]:
        b, names = z_t.shape[0], list(dict.fromkeys(branches))
        if "null" in names and "uncond" in names and texts["null"] is texts["uncond"]:
            names.remove("null")  # no negative prompt: the empty prompt is the uncond branch already
        z, ts, embs = [z_t] * len(names), [t] * len(names), [texts[n] for n in names]
        perp = "cond" in names and neg is not None
        if perp:
            z.append(z_t[neg[1]])
            ts.append(t[neg[1]])
            embs.append(neg[0].to(texts["cond"].dtype))
        z, ts = torch.cat(z), torch.cat(ts)
        rows.append(z.shape[0])
        with torch.no_grad():
            out = as_eps(unet(z.to(dtype), ts, encoder_hidden_states=torch.cat(embs)).sample, z, ts)
        got = {n: out[i * b:(i + 1) * b] for i, n in enumerate(names)}
        if perp:
            got["perp"] = out[len(names) * b:]
        return {n: got[n] if n in got else got["uncond"] for n in (*branches, *(["perp"] if perp else []))}

    def guided(e: dict[str, Tensor], scale: float) -> Tensor:
        return guide(e["cond"], e["uncond"], scale, e.get("perp"), neg if "perp" in e else None)

    def copy(z: Tensor, t: Tensor) -> Tensor:  # VSD: the LoRA copy, conditioned on the render's prompt, with graph
        return as_eps(vsd.forward(unet, z.to(dtype), t, encoder_hidden_states=texts["cond"]).sample, z, t)

    return Denoiser(x0, abar_all, eps=eps, guide=guided, copy=None if vsd is None else copy,
                    copy_optimizer=None if vsd is None else vsd.optimizer), rows


def guide(eps_cond: Tensor, eps_uncond: Tensor, scale: float, eps_neg: Tensor | None = None,
          neg: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Classifier-free guidance, or Perp-Neg with the branches of `perp_neg_branches` (module docstring)."""
    from engine.sds import classifier_free_guidance

    eps_cond, eps_uncond = eps_cond.float(), eps_uncond.float()
    if eps_neg is None:
        return classifier_free_guidance(eps_uncond, eps_cond, scale)
    _, index, lam = neg
    d_pos = eps_cond - eps_uncond  # [B, ...]
    d = eps_neg.float() - eps_uncond[index]  # [M, ...]
    p = d_pos[index]
    coef = (d * p).flatten(1).sum(1) / (p * p).flatten(1).sum(1).clamp_min(1e-6)
    shape = (-1,) + (1,) * (d.dim() - 1)
    perp = d - coef.view(shape) * p
    delta = d_pos.index_add(0, index, -lam.float().view(shape) * perp)
    return eps_uncond + scale * delta


def v_to_eps(v: Tensor, z_t: Tensor, abar: Tensor) -> Tensor:
    """eps from a v-prediction: v = sqrt(abar) eps - sqrt(1 - abar) z0  =>  eps = sqrt(abar) v + sqrt(1 - abar) z_t."""
    a = abar.view(-1, *[1] * (v.dim() - 1))
    return a.sqrt() * v.float() + (1.0 - a).sqrt() * z_t.float()

