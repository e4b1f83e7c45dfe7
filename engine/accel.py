"""nerfacc's and gsplat's CUDA kernels: found, loaded or built only when asked, never inside a training step.

nerfacc 0.5.3 compiles its kernels with torch's JIT builder the first time `nerfacc.cuda._backend` is
imported: minutes with `nvcc`, and without it the module's `_C` is None and every kernel raises
`AttributeError`. An interrupted build leaves a `lock` file that makes the next build wait forever.
So the renderer's pure-torch occupancy path is the baseline on every device, and the kernels are an
accelerator: `kernels_status()` looks without importing anything that builds, `load_kernels()` imports
them only when a finished build (or a prebuilt wheel) is there, and `build_kernels()` (the command
`python -m engine build-kernels`) is the one place that compiles.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)
EXTENSION = "nerfacc_cuda"  # the name nerfacc gives its JIT extension


def build_dir(extension: str = EXTENSION) -> Path:
    """Where torch's JIT builder keeps an extension (nerfacc's by default) for this Python and CUDA version."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(extension, verbose=False))


def kernels_status() -> dict:
    """{"cuda": bool, "built": bool, "prebuilt": bool, "nvcc": bool, "lock": bool, "detail": str}; imports nothing
    that builds."""
    cuda = torch.cuda.is_available()
    prebuilt = importlib.util.find_spec("nerfacc.csrc") is not None
    nvcc = shutil.which("nvcc") is not None
    folder = build_dir() if torch.version.cuda else None
    built = bool(folder and any(folder.glob(f"{EXTENSION}*.so")))
    lock = bool(folder and (folder / "lock").exists())
    if not cuda:
        detail = "no CUDA device: the pure-torch renderer is used"
    elif prebuilt or built:
        detail = "built: nerfacc's CUDA sampler is used"
    elif nvcc:
        detail = "not built: run `python -m engine build-kernels` once (a few minutes) to use them"
    else:
        detail = "not built and no nvcc: the pure-torch renderer is used (install a CUDA toolkit to build them)"
    if lock and not built:
        detail += f"; a stale build lock is at {folder / 'lock'} (build-kernels removes it)"
    return {"cuda": cuda, "built": prebuilt or built, "prebuilt": prebuilt, "nvcc": nvcc, "lock": lock,
            "detail": detail}


def load_kernels() -> bool:
    """Import nerfacc's kernels if a finished build exists; True when they are usable. Never builds."""
    status = kernels_status()
    if not (status["cuda"] and status["built"]):
        return False
    try:
        from nerfacc.cuda._backend import _C
    except (ImportError, OSError, RuntimeError) as err:
        log.warning("nerfacc's built CUDA kernels did not load (%s); using the pure-torch renderer", err)
        return False
    return _C is not None


def build_kernels() -> bool:
    """Compile nerfacc's CUDA kernels now (minutes), removing a stale lock first; True when they load."""
    if not torch.cuda.is_available() or not torch.version.cuda:
        raise RuntimeError("building nerfacc's kernels needs torch with CUDA and a CUDA device")
    if shutil.which("nvcc") is None:
        raise RuntimeError("building nerfacc's kernels needs nvcc (a CUDA toolkit matching torch's "
                           f"CUDA {torch.version.cuda}) on PATH")
    folder = build_dir()
    if not any(folder.glob(f"{EXTENSION}*.so")):
        shutil.rmtree(folder, ignore_errors=True)  # an interrupted build's lock and objects
    from nerfacc.cuda._backend import _C

    return _C is not None


# -- gsplat's rasterizer: the same rule (engine.splats.rasterize is the baseline on every device) ---------------
GSPLAT_EXTENSION = "gsplat_cuda"  # the name gsplat 1.5.3 gives its JIT extension


def gsplat_status() -> dict:
    """Like `kernels_status`, for gsplat's CUDA rasterizer; imports nothing that builds (gsplat's `_backend`
    compiles on import when nvcc is found)."""
    cuda = torch.cuda.is_available()
    installed = importlib.util.find_spec("gsplat") is not None
    prebuilt = installed and importlib.util.find_spec("gsplat.csrc") is not None
    nvcc = shutil.which("nvcc") is not None
    folder = build_dir(GSPLAT_EXTENSION) if torch.version.cuda else None
    built = bool(folder and any(folder.glob(f"{GSPLAT_EXTENSION}*.so")))
    if not installed:
        detail = "gsplat is not installed: the pure-torch rasterizer is used"
    elif not cuda:
        detail = "no CUDA device: the pure-torch rasterizer is used"
    elif prebuilt or built:
        detail = "built: gsplat's CUDA rasterizer is used"
    elif nvcc:
        detail = "not built: run `python -m engine build-kernels` once (a few minutes) to use them"
    else:
        detail = "not built and no nvcc: the pure-torch rasterizer is used"
    return {"cuda": cuda, "installed": installed, "built": prebuilt or built, "prebuilt": prebuilt, "nvcc": nvcc,
            "detail": detail}


def load_gsplat() -> bool:
    """Import gsplat's kernels if a finished build exists; True when they are usable. Never builds."""
    status = gsplat_status()
    if not (status["cuda"] and status["installed"] and status["built"]):
        return False
    try:
        from gsplat.cuda._backend import _C
    except (ImportError, OSError, RuntimeError) as err:
        log.warning("gsplat's built CUDA kernels did not load (%s); using the pure-torch rasterizer", err)
        return False
    return _C is not None


def build_gsplat() -> bool:
    """Compile gsplat's CUDA kernels now (minutes); True when they load."""
    if not torch.cuda.is_available() or shutil.which("nvcc") is None:
        raise RuntimeError("building gsplat's kernels needs torch with CUDA, a CUDA device and nvcc on PATH")
    if importlib.util.find_spec("gsplat") is None:
        raise RuntimeError("gsplat is not installed: pip install gsplat==1.5.3 (see requirements.txt)")
    from gsplat.cuda._backend import _C

    return _C is not None
