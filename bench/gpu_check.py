"""GPU check: the project's CUDA paths in a few minutes, on any machine with a CUDA GPU and torch built for it.

What it runs, in order, each part timed and reported even when another fails:
1. the CUDA tests with pytest: `tests/test_cuda.py` and every test marked
   `@pytest.mark.skipif(not torch.cuda.is_available(), ...)` elsewhere (found by `cuda_tests_ids`);
2. nerfacc's kernels: `engine.accel.kernels_status()`, and whether a finished build loads (nothing is built);
3. fp16 SDS steps with tiny Stable Diffusion and DeepFloyd IF pipelines built from config in a temp folder (the
   shared with the tests, `engine/testing.py`), loaded through `engine.priors.load_prior`;
4. the hash-grid backbone's training speed (it/s) at 64x64 with the oracle prior (`engine.trainer.Trainer`);
5. a 512x512 viewer frame from fixed cameras under no_grad (`Trainer.render_views`, as every view for people is);
6. splats (`field.backbone = "gaussians"`) trained by SD 2.1-base's SDS at 512x512 (DreamGaussian's render size),
   once through gsplat's CUDA rasterizer and once through the pure-torch one: it/s, Gaussians, and the seconds
   500 steps take at that rate. It needs the SD weights on the machine (`--sd`: a hub id in the cache or a
   folder) and, for the gsplat half, its kernels built (`python -m engine build-kernels`); a half that cannot
   run says why and is skipped, not failed;
7. peak GPU memory of each part.
It prints one line per part and writes one JSON (--out). No downloads: the tiny models are made here.

    python bench/gpu_check.py                      # CUDA, writes bench/results/gpu_check.json
    python bench/gpu_check.py --device cpu --tiny  # smoke run of the script itself (tests/test_gpu_check.py)
    python bench/gpu_check.py --list-tests         # print the CUDA tests' ids it would run, one a line
    python bench/gpu_check.py --sd /models/sd21b --splat-steps 500   # SD from a folder; time 500 splat steps

A machine with no package registry: it needs Python 3.11 with torch (CUDA build), transformers, safetensors,
sentencepiece and accelerate already installed (with their own dependencies: numpy, huggingface_hub, tokenizers,
regex, tqdm, pyyaml, filelock); carry the rest as a folder of wheels. On a machine with internet, from this
repository (the versions are the ones the project is tested with):

    pip download --only-binary=:all: --no-deps -d wheels/ \
        diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2 requests==2.34.2 urllib3==2.7.0 idna==3.21 \
        certifi==2026.5.20 charset_normalizer==3.4.7 nerfacc==0.5.3 rich==14.3.4 markdown-it-py==4.3.0 mdurl==0.1.2 \
        pygments==2.20.0 pytest==9.0.3 iniconfig==2.3.0 pluggy==1.6.0 protobuf==7.36.2 pillow==12.3.0
    # pillow (and protobuf's fastest wheel) are per platform: when this machine is not the GPU machine's
    # platform, add --platform manylinux2014_x86_64 --python-version 3.11 (or the GPU machine's own)

then copy wheels/ and the repository over and, on the GPU machine:

    pip install --no-index --find-links wheels/ wheels/*.whl
    python -m engine doctor && python bench/gpu_check.py

All but pillow and protobuf are pure Python. diffusers (and pillow, which it imports) for the SD / IF priors,
nerfacc (+ rich, markdown-it-py, mdurl, pygments) for the renderer's occupancy grid (its CUDA kernels are compiled
only by `python -m engine build-kernels`, never here), protobuf for IF's tokenizer, pytest (+ iniconfig, pluggy)
for the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SKIP_WITHOUT_CUDA = re.compile(r"^(pytestmark = )?@?pytest\.mark\.skipif\(not torch\.cuda\.is_available\(\)")


def cuda_tests_ids() -> list[str]:
    """tests/test_cuda.py and every test elsewhere skipped without CUDA (a whole file where `pytestmark` says so)."""
    ids = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        lines = path.read_text().splitlines()
        rel = str(path.relative_to(ROOT))
        if path.name == "test_cuda.py" or any(SKIP_WITHOUT_CUDA.match(ln) and ln.startswith("pytestmark") for ln in lines):
            ids.append(rel)
            continue
        for i, ln in enumerate(lines[:-1]):
            nxt = next((x for x in lines[i + 1:] if not x.startswith("@")), "")
            if SKIP_WITHOUT_CUDA.match(ln) and nxt.startswith("def test_"):
                ids.append(f"{rel}::{nxt[4:nxt.index('(')]}")
    return ids


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(trainer, live, device, *, warm: int, steps: int) -> tuple[float, dict]:
    """its/s of `steps` training steps after `warm` untimed ones, and the last step's metrics."""
    for _ in range(warm):
        trainer.step(live)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        metrics = trainer.step(live).metrics
    sync(device)
    return steps / (time.perf_counter() - t0), metrics


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1024**3, 3) if device.startswith("cuda") else None


class Skipped(Exception):
    """A part that cannot run on this machine (no CUDA, kernels not built, weights absent): reported, not failed."""


def part(results: dict, name: str, fn, device: str) -> None:
    """Run one part; its dict (or the error) goes to results[name] with its wall time and peak GPU memory."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        out = {"ok": True, **fn()}
    except Skipped as e:
        out = {"ok": True, "skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - one failing part must not hide the others
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    out["peak_gpu_gb"] = peak_gb(device)
    results[name] = out
    shown = {k: v for k, v in out.items() if k not in ("trace", "output")}
    print(f"{name}: {json.dumps(shown)}", flush=True)


def cuda_tests() -> dict:
    ids = cuda_tests_ids()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *ids]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = next((ln for ln in reversed(tail) if " passed" in ln or " failed" in ln or " skipped" in ln), "")
    if proc.returncode != 0:
        raise RuntimeError(f"pytest exit {proc.returncode}: {summary}\n" + "\n".join(tail[-40:]))
    return {"tests": ids, "summary": summary.strip("= ")}


def kernels() -> dict:
    from engine.accel import kernels_status, load_kernels

    status = kernels_status()
    return {**status, "loaded": load_kernels() if status["built"] else False}


def sds_steps(kind: str, device: str, steps: int, fp16: bool) -> dict:
    """SDS steps with a tiny pipeline of `kind` ("sd" or "if") saved to a temp folder and loaded as users load."""
    from engine.cameras import fixed_views
    from engine.priors import PriorOptions, SDSContext, load_prior
    from engine.testing import write_tiny_if, write_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        folder = (write_tiny_sd if kind == "sd" else write_tiny_if)(str(Path(tmp) / kind))
        extra = {"vae_resolution": 32} if kind == "sd" else {}
        prior = load_prior(f"{kind}:{folder}", device=device, options=PriorOptions(fp16=fp16, perp_neg=True), **extra)
        emb = prior.encode_prompt("a red cube")
        cams = fixed_views([0.0, 135.0], [10.0, 20.0], device=device)
        ctx = SDSContext(view_weights=cams.view_weights(), cameras=cams)
        images = torch.rand(2, 3, 16, 16, device=device)
        g = torch.Generator(device=device).manual_seed(0)
        times = []
        for _ in range(steps + 1):  # the first is a warm-up
            sync(device)
            t0 = time.perf_counter()
            grad, _ = prior.sds_grad(images, emb, ctx, guidance_scale=20.0, t_range=(0.02, 0.98), generator=g)
            sync(device)
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(grad).all():
            raise RuntimeError("non-finite SDS gradient")
        t5_device = next(prior.text_encoder.parameters()).device.type
        return {"dtype": str(prior.dtype).removeprefix("torch."), "ms_per_step": round(1000 * min(times[1:]), 2),
                "grad_norm": round(float(grad.float().norm()), 5), "text_encoder_after_encode": t5_device}


def hash_grid(device: str, resolution: int, steps: int, frame: int, tiny: bool = False) -> dict:
    """Training it/s of the hash-grid backbone with the oracle prior, then one frame of `frame`^2 pixels.
    tiny: one view of 16 samples per ray (the smoke run)."""
    from engine.cameras import fixed_views
    from engine.presets import live_defaults, preset
    from engine.priors import load_prior
    from engine.trainer import Trainer

    cfg = preset("oracle:cube", device).with_settings({"field.backbone": "hash", "render.resolution": resolution})
    if tiny:
        cfg = cfg.with_settings({"camera.batch_size": 1, "render.num_samples": 16})
    live = live_defaults(cfg.prior, prompt="a cube")
    trainer = Trainer(cfg, load_prior(cfg.prior, device=device), device, live)
    its, metrics = timed_steps(trainer, live, device, warm=1 if tiny else 5, steps=steps)
    cams = fixed_views([30.0], [20.0], device=device)
    frame_s = []
    with torch.no_grad():
        for _ in range(2 if tiny else 4):
            sync(device)
            t1 = time.perf_counter()
            out = trainer.render_views(cams, frame, frame, "lambertian", live=live)
            sync(device)
            frame_s.append(time.perf_counter() - t1)
    if not torch.isfinite(out.rgb).all():
        raise RuntimeError("non-finite frame")
    return {"resolution": resolution, "steps": steps, "its_per_s": round(its, 2), "loss": metrics.get("loss"),
            "frame_size": frame, "frame_ms": round(1000 * min(frame_s[1:] or frame_s), 1)}


def sd_prior(device: str, sd: str, tiny: bool, priors: dict):
    """SD 2.1-base (or, tiny, a tiny pipeline from config) loaded once for both splat parts; Skipped when absent."""
    from engine.priors import PriorOptions, load_prior
    from engine.testing import write_tiny_sd

    if "sd" not in priors:
        if tiny:
            priors["tmp"] = tempfile.TemporaryDirectory()
            folder, extra = write_tiny_sd(str(Path(priors["tmp"].name) / "sd")), {"vae_resolution": 32}
        else:
            folder, extra = sd, {}
        try:
            priors["sd"] = load_prior(f"sd:{folder}", device=device, options=PriorOptions(fp16=device.startswith("cuda")),
                                      **extra)
        except (FileNotFoundError, PermissionError, OSError) as err:
            priors["sd"] = Skipped(f"Stable Diffusion {sd!r} is not on this machine ({err}); pass --sd FOLDER")
    if isinstance(priors["sd"], Skipped):
        raise priors["sd"]
    return priors["sd"]


def splats_sd(device: str, backend: str, *, sd: str, steps: int, tiny: bool, priors: dict) -> dict:
    """SDS on a splat field rendered at 512^2 (tiny: 16^2) through `backend`, "gsplat" (its CUDA kernels) or
    "torch" (engine.splats.rasterize): it/s over `steps` steps after 3 warm-up steps, the Gaussian count, and
    the seconds 500 steps take at that rate."""
    from engine import accel
    from engine.presets import live_defaults, preset
    from engine.trainer import Trainer

    if not tiny and not device.startswith("cuda"):
        raise Skipped("SD 2.1-base at 512x512 is for CUDA; --tiny runs the smoke version")
    if backend == "gsplat" and not device.startswith("cuda"):
        raise Skipped("gsplat's rasterizer runs on CUDA only")
    if backend == "gsplat" and not accel.load_gsplat():
        raise Skipped(f"gsplat's kernels are not usable: {accel.gsplat_status()['detail']}")
    prior = sd_prior(device, sd, tiny, priors)
    resolution = 16 if tiny else 512
    cfg = preset("sd", device).with_settings({"field.backbone": "gaussians", "render.resolution": resolution})
    live = live_defaults("sd", prompt="a red cube")
    trainer = Trainer(cfg, prior, device, live)
    trainer.packed = backend == "gsplat"  # the trainer picks gsplat whenever it loads: the torch half turns it off
    its, metrics = timed_steps(trainer, live, device, warm=1 if tiny else 3, steps=steps)
    if not math.isfinite(float(metrics.get("loss", 0.0))):
        raise RuntimeError(f"non-finite loss after {trainer.step_count} steps")
    return {"backend": backend, "resolution": resolution, "steps": steps, "its_per_s": round(its, 2),
            "s_per_500_steps": round(500 / its, 1), "gaussians": len(trainer.field), "loss": metrics.get("loss")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"), help="JSON to write")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (smoke run): 8x8 training, a 32x32 frame")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest part")
    ap.add_argument("--list-tests", action="store_true", help="print the CUDA tests' ids (part 1) and exit")
    ap.add_argument("--sd", default=None, metavar="MODEL",
                    help="Stable Diffusion 2.1-base for the splat parts: hub id (from the cache) or folder")
    ap.add_argument("--splat-steps", type=int, default=100, help="timed SDS steps of each splat part (default 100)")
    args = ap.parse_args(argv)
    if args.list_tests:
        print("\n".join(cuda_tests_ids()))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (torch sees none); --device cpu runs the smoke version", file=sys.stderr)
        return 2
    dev = args.device
    res, steps, frame, sds = (8, 1, 32, 1) if args.tiny else (64, 100, 512, 10)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": dev, "python": platform.python_version(),
                     "torch": torch.__version__, "cuda": torch.version.cuda,
                     "gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None}
    print(json.dumps(results), flush=True)
    if not args.no_tests:
        part(results, "cuda_tests", cuda_tests, dev)
    part(results, "nerfacc_kernels", kernels, dev)
    fp16 = dev.startswith("cuda")
    part(results, "sds_sd_tiny", lambda: sds_steps("sd", dev, sds, fp16), dev)
    part(results, "sds_if_tiny", lambda: sds_steps("if", dev, sds, fp16), dev)
    part(results, "hash_grid_oracle", lambda: hash_grid(dev, res, steps, frame, args.tiny), dev)
    from engine.priors.stable_diffusion import DEFAULT_SD

    priors: dict = {}  # the SD prior, loaded once for both splat parts
    splat_kw = dict(sd=args.sd or DEFAULT_SD, steps=2 if args.tiny else args.splat_steps, tiny=args.tiny, priors=priors)
    for backend in ("gsplat", "torch"):
        part(results, f"splats_sd512_{backend}", lambda b=backend: splats_sd(dev, b, **splat_kw), dev)
    priors.clear()
    results["peak_gpu_gb"] = max((r["peak_gpu_gb"] or 0 for r in results.values() if isinstance(r, dict)), default=None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    failed = [k for k, v in results.items() if isinstance(v, dict) and not v.get("ok", True)]
    print(f"wrote {args.out}; " + (f"FAILED: {', '.join(failed)}" if failed else "all parts ok"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
