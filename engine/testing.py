"""Testing helpers shipped with the engine (as numpy.testing, torch.testing): what the tests and the benchmarks share.

- `tiny_config`, `tiny_live`: a run that trains in milliseconds a step and keeps going; `wait_for`: poll a
  condition with a timeout.
- Tiny random Stable Diffusion and DeepFloyd IF pipelines built from config and saved like the real checkpoints
  (`write_tiny_sd`, `write_tiny_if`, `write_tiny_taesd`), and a folder laid out as the Hugging Face cache lays
  out a download (`hf_cache`, `partial_cache`). The folders have the real layout (model_index.json, one
  subfolder per component); only the widths are tiny. Two details copy what real users download:
  - the SD tokenizer folder has no `model_max_length` (transformers then reports ~1e30);
  - the IF tokenizer folder holds only `spiece.model` and `tokenizer_config.json`, as DeepFloyd's repository ships
    it, so loading it needs sentencepiece and protobuf.
diffusers, transformers and sentencepiece are imported only by the writers that need them. Like all of engine/,
nothing here imports gradio, viser or playground/.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import string
import time

import numpy as np
import torch


# -- small runs: a config that trains in milliseconds a step, and a poll for a condition --------------------
def tiny_config(prior: str = "oracle:sphere", **kw):
    """16x16 renders, 16 samples per ray, a 16^3 grid, one view per step, shading after 2 albedo steps, the
    occupancy grid from step 2. `kw`: Config's own fields. A session built on it should get `tiny_live()`."""
    from engine.config import Config

    return Config(prior=prior, **kw).with_settings({
        "render.resolution": 16, "render.num_samples": 16, "field.grid_resolution": 16, "render.occupancy_warmup": 2,
        "render.occupancy_every": 2, "camera.batch_size": 1, "shading.albedo_only_steps": 2})


def tiny_live(**kw):
    """Live parameters for a session on `tiny_config`: 10,000 steps, so that it keeps running. `kw`: LiveParams'."""
    from engine.config import LiveParams

    return LiveParams(**{"steps": 10_000, **kw})


def wait_for(pred, timeout: float = 30.0, what: str = "condition", every: float = 0.02):
    """pred()'s first truthy value, polled every `every` seconds; AssertionError naming `what` after `timeout`
    seconds. (Poll a server at 0.2 s or more: each request takes CPU from the app it asks.)"""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


# -- tiny diffusers pipelines ------------------------------------------------------------------------------
WORDS = ("a", "red", "blue", "cube", "sphere", "front", "side", "back", "overhead", "view", "ugly", "blurry")


def write_tiny_sd(folder: str, prediction_type: str = "epsilon") -> str:
    """A Stable Diffusion 1.x/2.x-shaped pipeline (~0.2M-parameter U-Net) saved to `folder`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + ",.":  # character-level BPE: every word ends in a "</w>" symbol
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, prediction_type=prediction_type)  # what SD checkpoints ship
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)
    config_path = os.path.join(folder, "tokenizer", "tokenizer_config.json")
    config = json.load(open(config_path))
    config.pop("model_max_length", None)  # as some SD folders ship: transformers then says ~1e30
    json.dump(config, open(config_path, "w"))
    return folder


def write_spiece_tokenizer(folder: str) -> int:
    """A T5 tokenizer folder like DeepFloyd IF's: a unigram `spiece.model` trained here on WORDS, and its config.
    Returns the vocabulary size."""
    import sentencepiece

    sentences = [" ".join(WORDS[i:] + WORDS[:i]) + ", view" for i in range(len(WORDS))] * 4
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=32, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(folder, "spiece.model"), "wb") as fh:
        fh.write(model.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>"}, fh)
    return 32


def write_tiny_if(folder: str) -> str:
    """A DeepFloyd IF stage I-shaped pipeline (pixel U-Net, 3 -> 6 channels, T5 text encoder) saved to `folder`."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -1.0) for w in WORDS]
    placeholder = T5Tokenizer(vocab=vocab, extra_ids=0)  # replaced below by the spiece.model folder
    text_encoder = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", norm_num_groups=8)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                              dynamic_thresholding_ratio=0.95, sample_max_value=1.0)
    IFPipeline(tokenizer=placeholder, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, watermarker=None, requires_safety_checker=False).save_pretrained(folder)
    write_spiece_tokenizer(os.path.join(folder, "tokenizer"))
    return folder


def write_tiny_taesd(folder: str) -> str:
    """A tiny `AutoencoderTiny` with the SD VAE's downsampling (x2 here) and 4 latent channels."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(folder)
    return folder


# -- the Hugging Face cache's layout -----------------------------------------------------------------------
def repo_files(folder: str) -> list[str]:
    """Every file under `folder`, as sorted paths relative to it."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def hf_cache(src: str, cache: str, repo: str) -> str:
    """`src` laid out as the Hugging Face cache does: blobs/<hash>, snapshots/<commit>/<path> -> link, refs/main.
    Returns the snapshot folder."""
    commit = "0" * 40
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", commit)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as fh:
        fh.write(commit)
    for i, rel in enumerate(repo_files(src)):
        blob = os.path.join(root, "blobs", f"{i:040x}")
        shutil.copyfile(os.path.join(src, rel), blob)
        os.makedirs(os.path.dirname(os.path.join(snap, rel)), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(os.path.join(snap, rel))), os.path.join(snap, rel))
    return snap


def partial_cache(sd_dir: str, cache: str, repo: str = "org/half-sd") -> str:
    """A cache whose U-Net weights never finished: no snapshot link, a blobs/*.incomplete left behind."""
    snap = hf_cache(sd_dir, cache, repo)
    os.remove(os.path.join(snap, "unet", "diffusion_pytorch_model.safetensors"))
    open(os.path.join(snap, os.pardir, os.pardir, "blobs", "f" * 40 + ".incomplete"), "wb").close()
    return snap


# -- meshes against the field: a painted solid, a plain CPU rasteriser, IoU and PSNR ---------------------------
def painted_source(solid: str = "sphere", samples: int = 64, sigma_max: float = 200.0, eps: float = 0.01):
    """A RenderSource of an analytic solid (engine.priors.analytic) whose albedo varies smoothly over space,
    on a white background: a texture that maps the wrong texel to a point shows, where a constant colour would not."""
    from engine.config import BackgroundConfig, Config
    from engine.field import Background, FieldQuery, FieldSamples
    from engine.priors.analytic import AnalyticField
    from engine.source import RenderSource

    class PaintedField(AnalyticField):
        def prepare(self, occupancy=None) -> FieldQuery:
            plain = super().prepare(occupancy)

            def samples(x):
                s = plain.samples(x)
                return FieldSamples(s.density, paint(x), s.normal)

            return FieldQuery(samples, plain.density)

    cfg = Config(background=BackgroundConfig(kind="solid", color=(1.0, 1.0, 1.0))).with_settings(
        {"render.occupancy": False, "render.num_samples": samples})
    return RenderSource(PaintedField(solid, (0.5, 0.5, 0.5), sigma_max, eps), Background(cfg.background), None, cfg, step=0)


def surface_splats(solid: str = "sphere", count: int = 3000, color=(0.9, 0.1, 0.1), seed: int = 0):
    """A RenderSource of flat Gaussians on the surface of an engine.world solid, as a reconstruction leaves them:
    centres projected onto the surface (x - sdf(x) grad sdf), the shortest axis along the normal, discs of a std
    0.7 of their spacing, opacity 0.8; on a white background."""
    from engine.config import BackgroundConfig, Config
    from engine.field import Background
    from engine.source import RenderSource
    from engine.splats import blob
    from engine.world import solid_sdf

    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(4 * count, 3, generator=g) * 2 - 1) * 0.75
    for _ in range(4):  # a few Newton steps onto the level set
        x = x.detach().requires_grad_(True)
        d = solid_sdf(solid, x)
        (grad,) = torch.autograd.grad(d.sum(), x)
        x = x - d[:, None] * grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-8) ** 2
    x, n = x.detach()[:count], torch.nn.functional.normalize(grad[:count], dim=-1)
    n = n * torch.where(n[:, :1] < 0, -1.0, 1.0)  # a disc has no side: keep n_x >= 0 for the half-way quaternion
    quats = torch.nn.functional.normalize(torch.cat([1 + n[:, :1], torch.zeros(count, 1), -n[:, 2:], n[:, 1:2]], -1), dim=-1)
    area = {"sphere": 4 * np.pi * 0.55**2}.get(solid, 6 * (2 * float(x.abs().max())) ** 2)
    wide = 0.7 * (area / count) ** 0.5  # tangential scale, world units
    cfg = Config(background=BackgroundConfig(kind="solid", color=(1.0, 1.0, 1.0))).with_settings(
        {"field.backbone": "gaussians"})
    field = blob(cfg.field, cfg.splats).set_gaussians(
        means=x, scales=torch.tensor([[0.005, wide, wide]]).expand(count, 3), quats=quats,
        opacities=torch.full((count,), 0.8), albedo=torch.tensor([color]).expand(count, 3))
    return RenderSource(field.requires_grad_(False), Background(cfg.background), None, cfg, step=0)


def paint(x: torch.Tensor) -> torch.Tensor:
    """Albedo [N, 3] in [0.1, 0.9]: three slanted waves of about 1.5 periods across the unit ball."""
    w = torch.tensor([[5.0, 1.5, 0.0], [0.0, 5.0, 2.0], [2.5, 0.0, 5.0]], dtype=x.dtype, device=x.device)
    return 0.5 + 0.4 * torch.sin(x @ w.T + torch.tensor([0.0, 1.0, 2.0], dtype=x.dtype, device=x.device))


def check_views(n: int = 8, distance: float = 2.5, focal: float = 1.0):
    """n cameras around the object, alternately 25 degrees above and below the equator."""
    from engine.cameras import fixed_views

    return fixed_views([360.0 * i / n for i in range(n)], [25.0 if i % 2 == 0 else -25.0 for i in range(n)],
                       distance, focal)


def rasterize(mesh, cams, size: int, background=(1.0, 1.0, 1.0)):
    """A trimesh mesh seen by each camera (z-buffer at pixel centres, perspective-correct interpolation): its
    texture (TextureVisuals: UVs, bilinear lookup, v up) or its vertex colours. Returns images [B, S, S, 3]
    float32 in [0, 1] and coverage [B, S, S] bool."""
    from engine.texture import cover

    verts = np.asarray(mesh.vertices, np.float64)
    faces = np.asarray(mesh.faces, np.int64)
    uv = getattr(mesh.visual, "uv", None)
    if uv is not None:
        attr, image = np.asarray(uv, np.float64), _texture_image(mesh)
    else:
        attr, image = np.asarray(mesh.visual.vertex_colors, np.float64)[:, :3] / 255.0, None
    out = np.tile(np.asarray(background, np.float32), (len(cams), size, size, 1))
    mask = np.zeros((len(cams), size, size), bool)
    for b in range(len(cams)):
        c2w = cams.c2w[b].double().cpu().numpy()
        p = (verts - c2w[:3, 3]) @ c2w[:3, :3]  # camera space: x right, y up, looking down -z
        z = -p[:, 2]
        f = float(cams.focal[b]) * size
        screen = np.stack([size / 2 + f * p[:, 0] / z, size / 2 - f * p[:, 1] / z], -1)
        best = np.full(size * size, np.inf)
        value = np.zeros((size * size, attr.shape[1]))
        for fi, x, y, bary in cover(screen[faces], size, size):
            w = bary / z[faces[fi]]  # perspective correction: interpolate attr / z and 1 / z linearly on screen
            depth = 1.0 / w.sum(-1)
            w = w * depth[:, None]
            pix = y * size + x
            order = np.lexsort((depth, pix))  # nearest first within each pixel
            first = order[np.r_[True, pix[order][1:] != pix[order][:-1]]]
            near = depth[first] < best[pix[first]]
            sel = first[near]
            best[pix[sel]] = depth[sel]
            value[pix[sel]] = np.einsum("nk,nkd->nd", w[sel], attr[faces[fi[sel]]])
        hit = np.isfinite(best)
        colour = value if image is None else _bilinear(image, value)
        out[b].reshape(-1, 3)[hit] = colour[hit]
        mask[b] = hit.reshape(size, size)
    return out, mask


def _texture_image(mesh):
    material = mesh.visual.material
    img = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    return np.asarray(img.convert("RGB"), np.float32) / 255.0


def _bilinear(image, uv):
    """image [S, S, 3] at UVs [N, 2] (v up, texel centres at (i + 0.5) / S), edges clamped."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def field_views(source, size: int = 128, views: int = 8) -> dict:
    """The field's albedo render from `check_views(views)`: {"cams", "rgb" [B, S, S, 3], "opacity" [B, S, S]}."""
    cams = check_views(views)
    out = source.render(cams, size, size, shading="albedo")
    return {"cams": cams, "rgb": out.rgb.permute(0, 2, 3, 1).cpu().numpy(), "opacity": out.opacity[:, 0].cpu().numpy()}


def mesh_vs_field(source, mesh, size: int = 128, views: int = 8, reference: dict | None = None) -> dict:
    """Silhouette IoU and PSNR (dB) of the mesh's render against the field's albedo render from `views` cameras
    (or against `reference`, from field_views). The field's silhouette is opacity >= 0.5; PSNR counts the pixels
    both cover where the field is opaque (opacity >= 0.99), so edge pixels blended with the background do not."""
    import math

    ref = reference or field_views(source, size, views)
    image, covered = rasterize(mesh, ref["cams"], ref["rgb"].shape[1])
    field = ref["opacity"] >= 0.5
    iou = float((field & covered).sum() / max(1, (field | covered).sum()))
    inner = covered & (ref["opacity"] >= 0.99)
    mse = float(((image[inner] - ref["rgb"][inner]) ** 2).mean()) if inner.any() else 1.0
    return {"iou": iou, "psnr": 10 * math.log10(1.0 / max(mse, 1e-10)), "pixels": int(inner.sum())}


def drag_from_centre(page, locator, dx: float, dy: float) -> None:
    """Drag the mouse from the centre of a Playwright `locator` by (dx, dy) pixels, then let a frame settle (the
    browser tests orbit 3D views this way)."""
    box = locator.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y + dy, steps=8)
    page.mouse.up()
    page.wait_for_timeout(500)


def canvas_image(page, save=None) -> np.ndarray:
    """The largest canvas of a Playwright page (a 3D viewer's) as the page shows it: [H, W, 3] float32, 0-255, cut
    from one screenshot of the page, which goes to `save` when given (a WebGL page is slow to shoot: once is
    enough)."""
    from PIL import Image

    box = page.evaluate("""(() => { const c = [...document.querySelectorAll('canvas')].sort((a, b) =>
        b.clientWidth * b.clientHeight - a.clientWidth * a.clientHeight)[0].getBoundingClientRect();
        return {x: c.left, y: c.top, width: c.width, height: c.height}; })()""")
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    if save is not None:
        shot.save(save)
    x, y = round(box["x"]), round(box["y"])
    return np.asarray(shot.crop((x, y, x + round(box["width"]), y + round(box["height"])))).astype(np.float32)


ORACLE_LR = 0.03  # reconstruction tolerates a larger step than SDS from a learned prior
ORACLE_BUDGET = {"sphere": 500, "cube": 400, "cylinder": 500, "torus": 700, "cone": 900}


def steps_to_iou(solid: str, target: float = 0.9, every: int = 50, settings: dict | None = None):
    """SDS with the oracle prior (weighted reconstruction) until the density level set's IoU against the analytic
    solid reaches `target`, checked every `every` steps within ORACLE_BUDGET[solid]. `settings`: dotted config
    settings over the defaults. Returns (trainer, IoU, seconds of training, seconds in all)."""
    from engine.config import Config, LiveParams
    from engine.export import RenderSource
    from engine.mesh import auto_threshold
    from engine.priors import load_prior
    from engine.priors.analytic import field_iou
    from engine.trainer import Trainer

    cfg = Config(prior=f"oracle:{solid}", seed=0).with_settings(settings or {})
    trainer = Trainer(cfg, load_prior(cfg.prior))
    live = LiveParams(prompt=f"a red {solid}", learning_rate=ORACLE_LR)
    iou, t0, training = 0.0, time.perf_counter(), 0.0
    while trainer.step_count < ORACLE_BUDGET[solid]:
        t1 = time.perf_counter()
        for _ in range(every):
            trainer.step(live)
        training += time.perf_counter() - t1
        iou = field_iou(trainer.field, solid, auto_threshold(RenderSource.from_trainer(trainer)))
        if iou >= target:
            break
    return trainer, iou, training, time.perf_counter() - t0
