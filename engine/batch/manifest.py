"""A batch's folder: DIR/manifest.json and DIR/manifest.csv (one row per run), DIR/index.html (the gallery),
DIR/<run-id>/ (checkpoint, exports). Every file is written to a temp name beside it and renamed over it
(`atomic_write`: temp file + os.replace), so a batch killed at any moment leaves no half-written file."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save as save_tensors

from engine.batch.gallery import write_gallery
from engine.batch.spec import SCORE_KEYS, RunOutputs, RunSpec
from engine.checkpoint import META, WEIGHTS, atomic_write, read_checkpoint

CSV_COLUMNS = ("run_id", "prompt", "seed", "prior", "settings", "status", "message", "steps", "step", "wall_s",
               "its_per_s", "attempts", "resumed_from", "steps_redone", *SCORE_KEYS, "files")


def batch_key(runs: list[RunSpec], outputs: RunOutputs) -> str:
    """What makes a batch the same batch: its runs and what they export."""
    return hashlib.sha1(json.dumps([sorted(r.run_id for r in runs), dataclasses.asdict(outputs)]).encode()).hexdigest()[:12]


def new_row(r: RunSpec) -> dict:
    """A run's manifest row before it starts."""
    return {"run_id": r.run_id, "prompt": r.prompt, "seed": r.seed, "prior": r.prior, "settings": dict(r.settings),
            "status": "pending", "message": "", "steps": r.steps, "step": 0, "wall_s": 0.0, "its_per_s": None,
            "attempts": 0, "resumed_from": [], "steps_redone": 0, "files": {}}


def read_manifest(out: Path) -> dict | None:
    """DIR/manifest.json as a dict, None where there is none; RuntimeError where it does not parse."""
    if not (out / "manifest.json").exists():
        return None
    try:
        doc = json.loads((out / "manifest.json").read_text())
        if not isinstance(doc["runs"], list) or not isinstance(doc["batch"], str):
            raise TypeError("no list of runs and batch key")
        return doc
    except (ValueError, KeyError, TypeError) as err:
        raise RuntimeError(f"{out}/manifest.json is unreadable ({err}); use another --out") from None


def open_folder(out: Path, key: str, runs: list[RunSpec]) -> dict[str, dict]:
    """Run id -> manifest row (new rows for new runs); RuntimeError for a folder of another batch. Reads only."""
    doc = read_manifest(out)
    rows = {r["run_id"]: r for r in doc["runs"]} if doc else {}
    if doc and doc["batch"] != key:
        raise RuntimeError(f"{out} holds another batch ({len(rows)} runs, manifest.json); use another --out")
    if not doc and out.exists() and any(out.iterdir()):
        raise RuntimeError(f"{out} holds files but no manifest.json (not a batch folder); use another --out")
    for r in rows.values():  # a done run whose checkpoint went missing runs again; a stopped one is pending
        missing = r["status"] == "done" and not (out / r["run_id"] / META).exists()
        r["status"] = "pending" if missing or r["status"] == "running" else r["status"]
    return {r.run_id: rows.get(r.run_id) or new_row(r) for r in runs}


def write_manifest(out: Path, key: str, rows: list[dict]) -> None:
    """DIR/manifest.json, DIR/manifest.csv and DIR/index.html, each written atomically."""
    doc = {"batch": key, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": rows}
    atomic_write(out / "manifest.json", lambda p: Path(p).write_text(json.dumps(doc, indent=1)))
    text = io.StringIO()
    table = csv.DictWriter(text, CSV_COLUMNS, extrasaction="ignore")
    table.writeheader()
    table.writerows({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()} for r in rows)
    atomic_write(out / "manifest.csv", lambda p: Path(p).write_text(text.getvalue()))
    write_gallery(out, rows, title=out.resolve().name)


def settle(out: Path) -> dict[str, int]:
    """After a batch was stopped hard (its driver killed): runs left "running" in the manifest are pending
    again, with the step of the checkpoint in their folder; the count of rows by status."""
    doc = read_manifest(out)
    if doc is None:
        return {}
    for r in doc["runs"]:
        if r["status"] == "running":
            r["status"] = "pending"
            r["step"] = checkpoint_step(out / r["run_id"]) or r["step"]
    write_manifest(out, doc["batch"], doc["runs"])
    return {s: sum(r["status"] == s for r in doc["runs"]) for s in ("done", "failed", "pending")}


def checkpoint_step(folder: Path) -> int | None:
    """The step of the weights in a run folder (safetensors metadata), None without them."""
    try:
        with safe_open(str(folder / WEIGHTS), "pt") as f:
            return int(f.metadata()["step"])
    except (OSError, KeyError, ValueError, TypeError, RuntimeError):
        return None


def disk_checkpoint(out: Path, run_id: str) -> tuple[dict, bytes] | None:
    """The checkpoint an earlier, interrupted invocation left in DIR/<run-id>/, as (meta, safetensors bytes).
    A batch killed between the checkpoint's two renames leaves weights one segment ahead of their description:
    the weights (optimizer and generator state included) win, with their step."""
    folder = out / run_id
    for stray in folder.glob(".*.part*"):  # temp files of writes that a kill cut short
        stray.unlink(missing_ok=True)
    if not (folder / META).exists():
        return None
    meta, tensors = read_checkpoint(folder)
    step = checkpoint_step(folder)
    if step is not None and step != meta["step"]:
        meta = {**meta, "step": step}
    return meta, save_tensors(tensors)
