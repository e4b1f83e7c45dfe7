"""What the diffusers-based priors (Stable Diffusion, DeepFloyd IF) share.

- Finding the weights: a local folder, or a hub id found in the local Hugging Face cache; when neither
  and the Hub cannot be reached, fail within seconds with one message saying what is missing and how
  to get it (diffusers alone retries for ~28 s and then names a file, not the model).
- Loading a component with its name in any error ("unet: ...").
- View-dependent prompts, their embeddings mixed by the camera's view weights, and a per-prompt cache.
- One batched U-Net call for the conditional, unconditional and Perp-Neg branches, and the guidance.

Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm"): besides the positive
(view-mixed) prompt, each render gets the three ring view prompts ("front/side/back view") as negatives.
Only the part of each negative direction perpendicular to the positive one is removed:

    d_pos = eps(y_pos) - eps(y_neg_prompt)            d_k = eps(y_k) - eps(y_neg_prompt)
    d_k_perp = d_k - <d_k, d_pos> / |d_pos|^2 * d_pos
    eps_hat  = eps(y_neg_prompt) + s * (d_pos - sum_k lambda_k * d_k_perp)

so "back view" is pushed away from what makes a front view a front view (a face) without cancelling
what the two prompts share (the object). lambda_k = scale * (1 - w_k)^2 with w_k the render's view
weight for label k: a label the camera sees gets no push, the opposite side the full `scale`.
It costs three more U-Net evaluations per render.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from engine.sds import VIEWS

VIEW_SUFFIXES = tuple(f", {v} view" for v in VIEWS)  # appended to the prompt, peers' style
RING = 3  # the first three VIEWS (front, side, back) are Perp-Neg's negative prompts
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def view_prompts(prompt: str) -> list[str]:
    """The prompt once per view label, in VIEWS order."""
    return [prompt + s for s in VIEW_SUFFIXES]


def default_dtype(device, dtype: torch.dtype | None) -> torch.dtype:
    """fp16 on CUDA (peers' choice: half the memory, same results for SDS), fp32 elsewhere."""
    if dtype is not None:
        return dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------------
# Finding and loading weights


def _offline() -> bool:
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                  "TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers within `timeout` seconds (through the hub client's own proxy settings)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - whatever the failure (DNS, proxy, TLS, timeout), the Hub is not usable
        return False


def missing_message(label: str, repo_id: str, local: str, reason: str, gated: bool = False) -> str:
    """One message: which model is missing, and the two ways to get it."""
    login = " (a gated model: accept its licence on the Hub and `hf auth login` first)" if gated else ""
    return (f"{label} weights '{repo_id}' are not on this machine and {reason}. Download them on a machine "
            f"with internet{login}: `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download "
            f"{repo_id}`) and copy the Hugging Face cache here, or point to a local diffusers folder: "
            f"{local} (docs/priors.md lists the files needed).")


def resolve_source(source: str, label: str, local: str, components: tuple[str, ...], *,
                   cache_dir: str | None = None, gated: bool = False) -> str:
    """A local folder to load from, or the hub id itself when it is not cached and the Hub is reachable.

    Raises FileNotFoundError (missing folder; hub id neither cached nor reachable) or RuntimeError
    (folder lacks a component).
    """
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        check_folder(path, label, components)
        return path
    parent = os.path.dirname(path)
    if not _HUB_ID.match(source) or source.count("/") > 1 or (parent and os.path.isdir(parent)):
        layout = f" (a diffusers folder with {', '.join(c + '/' for c in components)})" if components else ""
        raise FileNotFoundError(f"{label} folder not found: {source}. Pass an existing folder{layout} or a hub id.")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(source, cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError: not cached
        folder = None
    if folder is not None and all(os.path.isdir(os.path.join(folder, c)) for c in components):
        return folder
    if _offline():
        raise FileNotFoundError(missing_message(label, source, local, "HF_HUB_OFFLINE is set", gated))
    if not hub_reachable():
        raise FileNotFoundError(missing_message(label, source, local, "the Hugging Face Hub cannot be reached",
                                                gated))
    return source


def check_folder(folder: str, label: str, components: tuple[str, ...]) -> None:
    """Raise RuntimeError naming the first component subfolder that is absent."""
    for c in components:
        if not os.path.isdir(os.path.join(folder, c)):
            raise RuntimeError(f"{c}: missing from the {label} folder {folder} (a diffusers pipeline folder "
                               f"has {', '.join(x + '/' for x in components)})")


def local_variant(folder: str, component: str) -> str | None:
    """"fp16" when a local component folder holds only fp16 weight files (as a lean download leaves it)."""
    path = os.path.join(folder, component)
    if not os.path.isdir(path):
        return None
    weights = [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".index.json"))]
    if weights and all(".fp16" in f for f in weights):
        return "fp16"
    return None


def load_component(name: str, loader: Callable, source: str, **kwargs):
    """`loader(source, subfolder=name, **kwargs)`, with the component's name in any error.

    A local folder with only fp16 weight files is loaded with variant="fp16" unless a variant is given.
    """
    if "variant" in kwargs and kwargs["variant"] is None and os.path.isdir(source):
        kwargs["variant"] = local_variant(source, name)
    try:
        return loader(source, subfolder=name, **kwargs)
    except Exception as e:
        raise RuntimeError(f"{name}: could not be loaded from {source}: {error_detail(e)}") from e


def error_detail(e: Exception) -> str:
    """The first two non-empty lines of an error, e.g. "Error(s) in loading state_dict ...: size mismatch ..."."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return " ".join(lines[:2])[:500]


def check_width(component: str, expected: int | None, got: int, what: str) -> None:
    """Raise RuntimeError when two components disagree on a width (mixed checkpoints)."""
    if expected is not None and expected != got:
        raise RuntimeError(f"{component}: expects {what} of width {expected} but gets {got} "
                           "(components from different checkpoints?)")


@contextlib.contextmanager
def on_device(device, offload: bool, *modules: torch.nn.Module):
    """Run `modules` on `device`; with `offload` they live on the CPU between uses (model-level offload)."""
    if offload:
        for m in modules:
            m.to(device)
    try:
        yield
    finally:
        if offload:
            for m in modules:
                m.to("cpu")


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
    """The prompt with each view suffix as cond [4, L, D], the negative prompt as uncond [1, L, D] and the
    bare prompt as plain [1, L, D], encoded once per (prompt, negative prompt) through `prior._encode_texts`
    and `prior.cache`."""
    from engine.priors.base import PromptEmbedding

    def make() -> PromptEmbedding:
        emb, truncated = prior._encode_texts(view_prompts(prompt) + [negative_prompt, prompt])
        warnings = [f"prompt longer than {max_length} tokens: truncated"] if truncated else []
        return PromptEmbedding(prompt, negative_prompt, cond=emb[:4], uncond=emb[4:5], warnings=warnings,
                               plain=emb[5:6])

    return prior.cache.get((prompt, negative_prompt), make)


def text_batch(emb, view_weights: Tensor, perp_neg: bool, view_dependent: bool = True
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-render text: cond [B, L, D] (view-weighted mix, or the plain prompt when not view_dependent),
    uncond [B, L, D], and with Perp-Neg the three ring-view embeddings as negatives [B, 3, L, D] (else None;
    Perp-Neg needs the view prompts, so it is off when view_dependent is)."""
    b = view_weights.shape[0]
    if view_dependent or emb.plain is None:
        cond = mix_views(emb.cond, view_weights)
    else:
        cond = emb.plain.expand(b, *emb.plain.shape[1:])
    uncond = emb.uncond.expand(b, *emb.uncond.shape[1:])
    neg = emb.cond[None, :RING].expand(b, -1, -1, -1) if perp_neg and view_dependent else None
    return cond, uncond, neg


def mix_views(cond: Tensor, view_weights: Tensor) -> Tensor:
    """Per-render embedding sum_v w_bv cond_v. cond [4, L, D], view_weights [B, 4] -> [B, L, D]."""
    w = view_weights.to(device=cond.device, dtype=cond.dtype)
    return torch.tensordot(w, cond, dims=([1], [0]))


def perp_neg_weights(view_weights: Tensor, scale: float) -> Tensor:
    """lambda_k = scale * (1 - w_k)^2 for the ring labels (front, side, back). [B, 4] -> [B, 3]."""
    return scale * (1.0 - view_weights[:, :RING]) ** 2


# ---------------------------------------------------------------------------------------------------
# Noise prediction and guidance


@torch.no_grad()
def predict_noise(unet, z_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, neg: Tensor | None = None,
                  channels: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One batched U-Net call for all branches; no graph through the U-Net (SDS skips its Jacobian).

    z_t [B, C, h, w], t [B], cond / uncond [B, L, D], neg [B, K, L, D] or None.
    channels: keep the first `channels` outputs (IF predicts noise and variance: 6 -> 3).
    Returns eps_cond, eps_uncond [B, C, h, w] and eps_neg [B, K, C, h, w] (None without neg).
    """
    b = z_t.shape[0]
    embs = [cond, uncond] + ([neg[:, k] for k in range(neg.shape[1])] if neg is not None else [])
    n = len(embs)
    out = unet(torch.cat([z_t] * n), torch.cat([t] * n), encoder_hidden_states=torch.cat(embs)).sample
    if channels is not None:
        out = out[:, :channels]
    eps = out.view(n, b, *out.shape[1:])
    eps_neg = eps[2:].transpose(0, 1) if neg is not None else None
    return eps[0], eps[1], eps_neg


def guide(eps_cond: Tensor, eps_uncond: Tensor, scale: float, eps_neg: Tensor | None = None,
          neg_weights: Tensor | None = None) -> Tensor:
    """Classifier-free guidance, or Perp-Neg when negatives are given (see the module docstring)."""
    from engine.sds import classifier_free_guidance

    if eps_neg is None:
        return classifier_free_guidance(eps_uncond, eps_cond, scale)
    d_pos = (eps_cond - eps_uncond).float()
    flat = d_pos.flatten(1)
    norm2 = (flat * flat).sum(1).clamp_min(1e-12)
    delta = d_pos
    for k in range(eps_neg.shape[1]):
        d_k = (eps_neg[:, k] - eps_uncond).float()
        coef = (d_k.flatten(1) * flat).sum(1) / norm2
        perp = d_k - coef.view(-1, *[1] * (d_k.dim() - 1)) * d_pos
        delta = delta - neg_weights[:, k].to(perp).view(-1, *[1] * (d_k.dim() - 1)) * perp
    return classifier_free_guidance(eps_uncond.float(), eps_uncond.float() + delta, scale)


def v_to_eps(v: Tensor, z_t: Tensor, abar: Tensor) -> Tensor:
    """eps from a v-prediction: v = sqrt(abar) eps - sqrt(1 - abar) z0  =>  eps = sqrt(abar) v + sqrt(1 - abar) z_t."""
    a = abar.view(-1, *[1] * (v.dim() - 1))
    return a.sqrt() * v.float() + (1.0 - a).sqrt() * z_t.float()


def randn(shape, generator: torch.Generator, device, dtype) -> Tensor:
    """Noise drawn on the generator's device (so runs repeat whatever the model's device), then moved."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)
