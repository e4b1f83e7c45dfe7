"""The embedded prior: a small text-to-image diffusion model trained on the procedural world, shipped in assets/.

It needs no download and runs SDS on a CPU. A word-level text encoder over the world's vocabulary
(`VOCABULARY`) feeds a pixel-space diffusers `UNet2DConditionModel` at 32x32: the token states go to
cross-attention, their mean is added to the timestep embedding. `python -m lab.train_prior` trains it;
`EmbeddedPrior.load()` reads assets/embedded_prior.safetensors (+ .json: config and vocabulary).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine import sds, world
from engine.priors.base import PromptEmbedding, SDSContext, check_distillation
from engine.priors.vsd import FullCopy, TrainableCopy
from engine.sds import VIEWS, classifier_free_guidance

ASSETS = Path(__file__).resolve().parents[2] / "assets"
DEFAULT_WEIGHTS = ASSETS / "embedded_prior.safetensors"
TRAIN_COMMAND = "python -m lab.train_prior --out runs/embedded --steps 7200 --minutes 106 --seed 0 --threads 2 --export assets"
VOCABULARY = world.VOCABULARY
MODEL_CONFIG = {  # the shipped model's architecture; the .json next to the weights overrides it
    "resolution": 32, "block_out_channels": [16, 32, 96], "layers_per_block": 1, "text_dim": 64,
    "max_tokens": 8, "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
}
VSD_LR = 1e-4  # Adam's learning rate for VSD's copy of the U-Net (ProlificDreamer's for its LoRA)


def vocabulary() -> list[str]:
    """Words the embedded prior understands (synonyms such as "box" map onto these)."""
    return list(VOCABULARY)


class Tokenizer:
    """Word-level: id 0 pads, id 1 starts every caption (so the empty caption is not all padding)."""

    def __init__(self, vocab=VOCABULARY, max_tokens: int = 8):
        self.vocab, self.max_tokens = list(vocab), max_tokens
        self.ids = {w: i + 2 for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab) + 2

    def words(self, text: str) -> tuple[list[str], list[str]]:
        """Known words (synonyms mapped) and ignored words of a text."""
        known, unknown = [], []
        for w in re.findall(r"[a-z]+", text.lower()):
            w = world.SYNONYMS.get(w, w)
            (known if w in self.ids else unknown).append(w)
        return known, unknown

    def __call__(self, texts: list[str]) -> Tensor:
        out = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1] + [self.ids[w] for w in self.words(t)[0]]
            ids = ids[: self.max_tokens]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


class TextEncoder(nn.Module):
    """Token embeddings, one transformer layer; returns token states [B, L, D] and their masked mean [B, D]."""

    def __init__(self, n_tokens: int, dim: int, max_tokens: int):
        super().__init__()
        self.tok = nn.Embedding(n_tokens, dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        pad = ids == 0
        h = self.norm(self.layer(self.tok(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad))
        keep = (~pad).float()[..., None]
        return h, (h * keep).sum(1) / keep.sum(1)


class EmbeddedModel(nn.Module):
    """Text encoder + U-Net, predicting the noise eps of images scaled to [-1, 1]."""

    def __init__(self, config: dict | None = None, vocab=VOCABULARY):
        super().__init__()
        self.config = {**MODEL_CONFIG, **(config or {})}
        c = self.config
        self.tokenizer = Tokenizer(vocab, c["max_tokens"])
        self.text = TextEncoder(len(self.tokenizer), c["text_dim"], c["max_tokens"])
        self.unet = UNet2DConditionModel(
            sample_size=c["resolution"], in_channels=3, out_channels=3,
            block_out_channels=tuple(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),  # cross-attention at 8x8 + mid
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            cross_attention_dim=c["text_dim"], attention_head_dim=8, norm_num_groups=8,
            class_embed_type="projection", projection_class_embeddings_input_dim=c["text_dim"])

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        return self.text(self.tokenizer(texts).to(self.text.pos.device))

    def forward(self, x: Tensor, t: Tensor, states: Tensor, pooled: Tensor) -> Tensor:
        return self.unet(x, t, encoder_hidden_states=states, class_labels=pooled).sample

    def scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(num_train_timesteps=self.config["num_train_timesteps"],
                             beta_schedule=self.config["beta_schedule"])

    def save(self, path: str | Path, meta: dict | None = None, half: bool = True) -> None:
        """Weights to path (.safetensors, fp16 by default) and config + vocabulary to path.json."""
        path = Path(path)
        sd = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(path))
        info = {"config": self.config, "vocabulary": self.tokenizer.vocab, **(meta or {})}
        path.with_suffix(".json").write_text(json.dumps(info, indent=1))

    @classmethod
    def from_file(cls, path: str | Path) -> EmbeddedModel:
        path = Path(path)
        info = json.loads(path.with_suffix(".json").read_text())
        model = cls(info["config"], info["vocabulary"])
        model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        model.meta = info
        return model.eval().requires_grad_(False)


SAMPLE_CFG = 2.0  # guidance of plain sampling (the sample grid, the sample score), not of SDS

@torch.no_grad()
def sample(model: EmbeddedModel, captions: list[str], guidance_scale: float = SAMPLE_CFG, steps: int = 25,
           generator: torch.Generator | None = None, text: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """DDIM samples for captions; returns images [B, 3, R, R] in [0, 1].

    text: (token states [B, L, D], pooled [B, D]) to use instead of encoding `captions` (e.g. a blend of two
    captions' encodings, as SDS's view-dependent prompting makes); captions then only gives B.

    Sampling wants far less guidance than SDS does: the shipped weights' samples are classified right
    0.75 / 0.85 / 0.91 / 0.88 / 0.85 / 0.73 / 0.52 / 0.22 of the time at CFG 1 / 1.5 / 2 / 2.5 / 3 / 4 / 5 /
    7.5 (MODEL_CARD.md), so SAMPLE_CFG is 2."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler().config)
    sched.set_timesteps(steps)
    r = model.config["resolution"]
    x = torch.randn(len(captions), 3, r, r, generator=generator)
    cond, cpool = text if text is not None else model.encode(captions)
    unc, upool = model.encode([""] * len(captions))
    for t in sched.timesteps:
        tt = t.expand(2 * len(captions))
        eps = model(torch.cat([x, x]), tt, torch.cat([unc, cond]), torch.cat([upool, cpool]))
        eu, ec = eps.chunk(2)
        x = sched.step(classifier_free_guidance(eu, ec, guidance_scale), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


class EmbeddedPrior:
    """The protocol (engine.priors.base.Prior) over an EmbeddedModel."""

    name = "embedded"
    distillations = sds.DISTILLATIONS

    def __init__(self, model: EmbeddedModel, device="cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.resolution = model.config["resolution"]
        self.num_train_timesteps = model.config["num_train_timesteps"]
        self.alphas_cumprod = model.scheduler().alphas_cumprod.to(self.device)

    @classmethod
    def load(cls, path: str | Path | None = None, device="cpu", **_ignored) -> EmbeddedPrior:
        """Load the shipped weights (or those at path); FileNotFoundError says how to train them."""
        path = Path(path) if path else DEFAULT_WEIGHTS
        if path.is_dir():
            path = path / "embedded_prior.safetensors"
        if not path.exists() or not path.with_suffix(".json").exists():
            raise FileNotFoundError(f"embedded prior weights not found at {path} (and its .json); "
                                    f"train them with: {TRAIN_COMMAND}")
        return cls(EmbeddedModel.from_file(path), device)

    def _encode(self, texts: list[str]) -> Tensor:
        states, pooled = self.model.encode(texts)
        return torch.cat([states, pooled[:, None]], 1)  # [B, L + 1, D]: token states, then their mean

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbedding:
        tok = self.model.tokenizer
        known, unknown = tok.words(prompt)
        neg_known, neg_unknown = tok.words(negative_prompt)
        warnings = []
        if unknown or neg_unknown:
            warnings.append(f"the embedded prior ignored {', '.join(repr(w) for w in unknown + neg_unknown)}; "
                            f"it knows only: {', '.join(tok.vocab)}")
        if not any(w in world.SHAPES for w in known):
            warnings.append(f"no shape named; the embedded prior knows: {', '.join(world.SHAPES)}")
        # the view suffix is the prior's to add: drop view words the user typed
        base = [w for w in known if w not in (*world.VIEW_WORDS, "view")]
        plain = " ".join(base)
        colourless = " ".join(w for w in base if w not in world.COLORS)  # textureless renders carry no colour
        return PromptEmbedding(
            prompt=prompt, negative_prompt=negative_prompt,
            cond=self._encode([f"{plain}, {v} view" for v in VIEWS]),
            uncond=self._encode([" ".join(neg_known)]),
            warnings=warnings, plain=self._encode([plain]), null=self._encode([""]) if neg_known else None,
            extra={"cond_textureless": self._encode([f"{colourless}, {v} view" for v in VIEWS]),
                   "plain_textureless": self._encode([colourless])})

    def sds_grad(self, images: Tensor, emb: PromptEmbedding, ctx: SDSContext, *, guidance_scale: float,
                 t_range: tuple[float, float], generator: torch.Generator) -> tuple[Tensor, dict]:
        check_distillation(self, ctx.distillation)
        # 1. Bring the renders to the prior's size and range: x in [-1, 1], [B, 3, R, R]
        src = images.detach().to(self.device, torch.float32).requires_grad_(images.shape[-1] != self.resolution)
        x = src if not src.requires_grad else F.interpolate(src, size=(self.resolution,) * 2, mode="bilinear",
                                                            antialias=True, align_corners=False)
        x = x * 2.0 - 1.0
        # 2. Text: the view embeddings mixed by each camera's view weights (textureless: colour words left out)
        b = x.shape[0]
        textureless = ctx.shading == "textureless"
        if ctx.view_dependent or emb.plain is None:
            table = emb.extra.get("cond_textureless", emb.cond) if textureless else emb.cond
            cond = torch.einsum("bv,vld->bld", ctx.view_weights.to(self.device, torch.float32), table)
        else:
            cond = (emb.extra.get("plain_textureless", emb.plain) if textureless else emb.plain).expand(b, -1, -1)
        texts = {"uncond": emb.uncond, "cond": cond, "null": emb.uncond if emb.null is None else emb.null}
        texts = {k: v.expand(b, -1, -1) if v.shape[0] == 1 else v for k, v in texts.items()}
        # 3. The distillation in pixel space (engine.sds): t, eps, the U-Net's branches, g w.r.t. x
        def copy(z: Tensor, t: Tensor) -> Tensor:  # VSD: the full copy of the U-Net, with graph
            return ctx.vsd.forward(self.model.unet, z, t, encoder_hidden_states=cond[:, :-1],
                                   class_labels=cond[:, -1]).sample

        vsd = ctx.distillation == "vsd"
        model = sds.Denoiser(x.detach(), self.alphas_cumprod, eps=self._eps(texts, emb.null is None), guide=_cfg,
                             copy=copy if vsd else None, copy_optimizer=ctx.vsd.optimizer if vsd else None)
        grad, info = sds.distillation_grad(ctx.distillation, model, guidance_scale=guidance_scale, t_range=t_range,
                                           generator=generator)
        # 4. x = 2 * image - 1, so d/d(image) doubles it; back to the renders' size through the resize's adjoint
        grad = 2.0 * grad
        if src.requires_grad:
            grad = torch.autograd.grad((x + 1) / 2, src, grad)[0]
        grad = torch.nan_to_num(grad).to(images.device, images.dtype)
        return grad, info

    def _eps(self, texts: dict[str, Tensor], null_is_uncond: bool):
        """eps(z, t, branches) for `sds.Denoiser`: one U-Net pass over the branches asked for, no graph (the
        negative prompt's branch first, as CFG's batch always was; "null" shares it when no negative is set)."""
        def eps(z: Tensor, t: Tensor, branches: tuple[str, ...]) -> dict[str, Tensor]:
            names = [n for n in ("uncond", "cond", "null") if n in branches]
            if null_is_uncond and "null" in names and "uncond" in names:
                names.remove("null")
            text = torch.cat([texts[n] for n in names])
            with torch.no_grad():
                out = self.model(torch.cat([z] * len(names)), torch.cat([t] * len(names)), text[:, :-1], text[:, -1])
            out = dict(zip(names, out.chunk(len(names)), strict=True))
            return {n: out.get(n, out.get("uncond")) for n in branches}
        return eps

    def vsd_copy(self) -> TrainableCopy:
        """A full trainable copy of the U-Net (2M parameters; the text encoder stays shared and frozen)."""
        return TrainableCopy(FullCopy(self.model.unet).to(self.device), lr=VSD_LR)


def _cfg(eps: dict[str, Tensor], scale: float) -> Tensor:
    return classifier_free_guidance(eps["uncond"], eps["cond"], scale)
