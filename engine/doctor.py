"""`python -m engine doctor [--json]`: what this machine can run, in a second or two.

Device, CUDA and its free memory, package versions (from package metadata: diffusers, transformers, nerfacc and
gsplat are not imported), nerfacc's and gsplat's kernels (`engine.accel`, which builds nothing), which priors load
offline (the embedded one; SD / IF pipelines found complete in the Hugging Face cache), fp16, and the memory
each prior needs at the default settings against what is free. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import torch

from engine.priors.base import PriorOptions

GB = 1024**3
EMBEDDED = Path(__file__).resolve().parents[1] / "assets" / "embedded_prior.safetensors"
PIPELINES = {"StableDiffusionPipeline": "sd", "IFPipeline": "if"}  # model_index.json's _class_name -> kind
# GB a prior needs on its device at the defaults (64x64 renders, batch 1, CFG batch 2): the peak, and the peak with
# --cpu-offload (the text encoder and U-Net never together). The arithmetic is in docs/priors.md, "Memory".
NEEDS_GB = {
    ("sd", "float16"): (4.5, 3.9), ("sd", "float32"): (9.1, 7.7),
    ("if", "float16"): (20.6, 11.7), ("if", "float32"): (36.7, 19.1),
}


def versions() -> dict:
    """Installed versions of the packages the engine relies on (None when absent), without importing them."""
    out = {}
    for name in ("torch", "nerfacc", "gsplat", "diffusers", "transformers", "huggingface_hub", "accelerate", "sentencepiece",
                 "protobuf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_facts() -> dict:
    """The device a run would use and its free / total memory in GB (host RAM on a CPU-only machine)."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return {"device": "cuda", "name": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                "free_gb": round(free / GB, 1), "total_gb": round(total / GB, 1)}
    free, total = host_memory()
    return {"device": "cpu", "name": f"{os.cpu_count()} CPU cores", "cuda": torch.version.cuda,
            "free_gb": round(free / GB, 1), "total_gb": round(total / GB, 1)}


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of RAM, from /proc/meminfo where there is one."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def cached_pipelines() -> list[dict]:
    """SD / IF pipelines in the Hugging Face cache: [{"kind", "id", "complete", "missing"}], read from disk only."""
    from huggingface_hub import constants

    from engine.priors import hub
    from engine.priors.deepfloyd import COMPONENTS as IF_COMPONENTS
    from engine.priors.stable_diffusion import COMPONENTS as SD_COMPONENTS

    components = {"sd": SD_COMPONENTS, "if": IF_COMPONENTS}
    root = Path(constants.HF_HUB_CACHE)
    found = []
    for repo in sorted(root.glob("models--*")) if root.is_dir() else []:
        ref = repo / "refs" / "main"
        snap = repo / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        index = snap / "model_index.json" if snap else None
        if not (index and index.is_file()):
            continue
        try:
            kind = PIPELINES.get(json.loads(index.read_text()).get("_class_name"))
        except (OSError, ValueError):
            continue
        if kind:
            gaps = hub.cache_gaps(str(snap), components[kind])
            found.append({"kind": kind, "id": repo.name[len("models--"):].replace("--", "/"), "complete": not gaps,
                          "missing": gaps[:8]})
    return found


def diagnose() -> dict:
    """Everything `doctor` reports, as a JSON-ready dict."""
    from engine.accel import gsplat_status, kernels_status
    from engine.priors.hub import HUB

    dev = device_facts()
    dtype = str(PriorOptions().dtype(dev["device"])).removeprefix("torch.")
    cache = cached_pipelines()
    priors = {"embedded": {"offline": EMBEDDED.is_file(), "needs_gb": 0.1, "fits": True}}
    for kind in ("sd", "if"):
        need, offload = NEEDS_GB[(kind, dtype)]
        ready = [c["id"] for c in cache if c["kind"] == kind and c["complete"]]
        priors[kind] = {"offline": bool(ready), "cached": ready, "default": HUB[kind][0], "dtype": dtype,
                        "needs_gb": need, "needs_gb_cpu_offload": offload, "free_gb": dev["free_gb"],
                        "fits": need <= dev["free_gb"], "fits_cpu_offload": offload <= dev["free_gb"]}
    return {**dev, "fp16": dtype == "float16", "versions": versions(), "nerfacc_kernels": kernels_status(),
            "gsplat_kernels": gsplat_status(),
            "priors": priors, "incomplete_in_cache": [c for c in cache if not c["complete"]],
            "hf_offline": os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")}


def report(facts: dict) -> str:
    """`diagnose()` as a few lines a person reads."""
    v = facts["versions"]
    lines = [f"device: {facts['device']} ({facts['name']}), {facts['free_gb']} of {facts['total_gb']} GB free"
             + (f", CUDA {facts['cuda']}" if facts["cuda"] else ""),
             "versions: " + ", ".join(f"{k} {v[k] or 'missing'}" for k in v),
             f"nerfacc kernels: {facts['nerfacc_kernels']['detail']}",
             f"gsplat kernels: {facts['gsplat_kernels']['detail']}",
             f"fp16: {'yes (CUDA)' if facts['fp16'] else 'no (fp32 on the CPU)'}", "priors:"]
    for kind, p in facts["priors"].items():
        if kind == "embedded":
            state = "ready (shipped in assets/)" if p["offline"] else f"MISSING {EMBEDDED}"
            lines.append(f"  embedded: {state}")
            continue
        where = f"in the cache: {', '.join(p['cached'])}" if p["cached"] else f"not cached (default {p['default']})"
        fit = ("fits" if p["fits"] else "fits with --cpu-offload" if p["fits_cpu_offload"] else "does not fit")
        lines.append(f"  {kind}: {where}; needs ~{p['needs_gb']} GB {p['dtype']} (--cpu-offload ~"
                     f"{p['needs_gb_cpu_offload']} GB), {p['free_gb']} GB free: {fit}")
    for c in facts["incomplete_in_cache"]:
        lines.append(f"  {c['kind']}: {c['id']} is only partly downloaded (missing {', '.join(c['missing'])})")
    if facts["device"] == "cpu":
        lines.append("  (sd and if are GPU priors: on a CPU one SDS step takes about a minute, docs/priors.md)")
    return "\n".join(lines)
