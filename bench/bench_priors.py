"""Milliseconds per SDS step of the Stable Diffusion and DeepFloyd IF priors on this machine.

By default it times the tiny random pipelines of tests/test_priors_diffusers.py (the code path of a real run,
tiny widths). `--full` also times the real architectures with random weights (no download): the SD 2.1-base
U-Net for one CFG step (batch 2, 64x64 latents) and the encode + backward of the SD VAE and of TAESD at 512x512.

    python bench/bench_priors.py            # tiny configs, ~1 min
    python bench/bench_priors.py --full     # + real-size U-Net / VAE / TAESD, ~3 min and ~6 GB of memory
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from engine.cameras import fixed_views  # noqa: E402
from engine.priors import PriorOptions, load_prior  # noqa: E402
from engine.priors.base import SDSContext  # noqa: E402
from engine.testing import write_tiny_if, write_tiny_sd, write_tiny_taesd  # noqa: E402


def time_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sds_step_ms(prior, batch: int, size: int, repeats: int) -> float:
    emb = prior.encode_prompt("a red cube")
    images = torch.rand(batch, 3, size, size)
    cams = fixed_views(torch.linspace(0, 180, batch).tolist(), [15.0] * batch)
    ctx = SDSContext(view_weights=cams.view_weights(), cameras=cams)  # Perp-Neg reads the cameras' angles
    gen = torch.Generator().manual_seed(0)
    return time_ms(lambda: prior.sds_grad(images, emb, ctx, guidance_scale=20.0, t_range=(0.02, 0.98),
                                          generator=gen), repeats)


def tiny(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        sd, deepfloyd = write_tiny_sd(f"{d}/sd"), write_tiny_if(f"{d}/if")
        taesd = write_tiny_taesd(f"{d}/taesd")
        rows = [
            ("SD tiny, VAE at 32^2 (latents 16^2)", load_prior(f"sd:{sd}", vae_resolution=32)),
            ("SD tiny, VAE at 64^2 (latents 32^2)", load_prior(f"sd:{sd}", vae_resolution=64)),
            ("SD tiny, TAESD at 64^2", load_prior(f"sd:{sd}", vae_resolution=64, taesd=taesd)),
            ("SD tiny, VAE at 32^2, Perp-Neg", load_prior(f"sd:{sd}", vae_resolution=32, options=PriorOptions(perp_neg=True))),
            ("IF tiny, 16^2 pixels", load_prior(f"if:{deepfloyd}")),
            ("IF tiny, 16^2 pixels, Perp-Neg", load_prior(f"if:{deepfloyd}", options=PriorOptions(perp_neg=True))),
        ]
        print("| prior (render 2 x 3 x 64^2) | ms / SDS step |\n|---|---|")
        for label, prior in rows:
            print(f"| {label} | {sds_step_ms(prior, 2, 64, repeats):.0f} |")


def unet_cfg_step_ms() -> float:
    """One CFG step (batch 2, 64x64 latents) of SD 2.1-base's U-Net architecture (865M parameters), random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).eval().requires_grad_(False)
    z, emb, t = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 1024), torch.tensor([500, 500])
    with torch.no_grad():
        return time_ms(lambda: unet(z, t, encoder_hidden_states=emb), repeats=1, warmup=0)


def full() -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    print(f"| SD 2.1-base U-Net, one CFG step (batch 2, 64^2 latents) | {unet_cfg_step_ms() / 1e3:.1f} s |")
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    taesd = AutoencoderTiny()
    for label, model in (("SD VAE", vae), ("TAESD", taesd)):
        model.requires_grad_(False)

        def encode_backward(model=model):
            x = torch.rand(1, 3, 512, 512, requires_grad=True)
            out = model.encode(x)
            z = out.latents if hasattr(out, "latents") else out.latent_dist.mean
            torch.autograd.grad(z, x, torch.ones_like(z))

        ms = time_ms(encode_backward, repeats=1, warmup=0)
        print(f"| {label} encode + backward, 1 x 512^2 | {ms / 1e3:.1f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="timed SDS steps per tiny prior (median reported)")
    ap.add_argument("--full", action="store_true", help="also time the real-size SD U-Net, VAE and TAESD")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    tiny(args.repeats)
    if args.full:
        print("\n| real architecture, random weights | time |\n|---|---|")
        full()


if __name__ == "__main__":
    main()
