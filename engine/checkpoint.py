"""Checkpoints: safetensors for every tensor (field, background, optimizer moments, occupancy grid,
generator state, VSD's trainable copy of the prior and its moments when the run has one) plus a JSON of the
config, live parameters, step and prompt. Nothing is unpickled,
so a checkpoint from elsewhere cannot run code. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.config import Config, LiveParams

WEIGHTS, META = "checkpoint.safetensors", "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message says which file and why."""


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def trainer_tensors(trainer) -> dict[str, torch.Tensor]:
    """Every tensor of a trainer's state, flat, for safetensors."""
    out = {f"field.{k}": v for k, v in trainer.field.state_dict().items()}
    out.update({f"background.{k}": v for k, v in trainer.background.state_dict().items()})
    out.update(_optimizer_tensors(trainer.optimizer, "optim."))
    if trainer.occupancy is not None:
        out.update({f"occupancy.{k}": v for k, v in trainer.occupancy.estimator.state_dict().items()})
    if trainer.vsd is not None:  # VSD's copy fits the renders over the run: a resumed run goes on with it
        out.update({f"vsd.{k}": v for k, v in trainer.vsd.delta.state_dict().items()})
        out.update(_optimizer_tensors(trainer.vsd.optimizer, "vsd_optim."))
    out["generator"] = trainer.generator.get_state()
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _optimizer_tensors(optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as {prefix + "group.param.key": tensor}."""
    out = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            for k, v in optimizer.state.get(p, {}).items():
                out[f"{prefix}{gi}.{pi}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], prefix: str, device) -> None:
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            state = section(tensors, f"{prefix}{gi}.{pi}.")
            if state:
                optimizer.state[p] = {k: v.to(device) if k != "step" else v for k, v in state.items()}


def checkpoint_state(trainer, live: LiveParams, extra: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a trainer, copied: take it under the session lock, write it after releasing."""
    meta = {"step": trainer.step_count, "skipped_steps": trainer.skipped_steps, "prior": trainer.prior.name,
            "prompt": live.prompt, "seed": trainer.cfg.seed, "config": trainer.cfg.to_dict(),
            "live": dataclasses.asdict(live), **(extra or {})}
    return meta, {k: v.clone() for k, v in trainer_tensors(trainer).items()}


def write_checkpoint(run_dir: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the two files of a checkpoint, each atomically; the weights first, so a meta file on disk
    never names a step whose weights are missing."""
    run_dir = Path(run_dir)
    atomic_write(run_dir / WEIGHTS, lambda p: save_file(tensors, p, metadata={"step": str(meta["step"])}))
    atomic_write(run_dir / META, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    return run_dir


def save_checkpoint(trainer, run_dir: str | Path, live: LiveParams, extra: dict | None = None) -> Path:
    """checkpoint.safetensors + checkpoint.json in run_dir (the caller holds the session lock)."""
    return write_checkpoint(run_dir, *checkpoint_state(trainer, live, extra))


def read_checkpoint(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a run folder; CheckpointError with a clear message if anything is off."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no run folder at {run_dir}")
    meta_path, weights_path = run_dir / META, run_dir / WEIGHTS
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"{p} is missing: not a run folder written by this app")
    try:
        meta = json.loads(meta_path.read_text())
        Config.from_dict(meta["config"])
        live_from_meta(meta)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path} is not a valid checkpoint description: {err}") from None
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({err})") from None
    return meta, tensors


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, with the prefix removed (a module's state dict)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_into(trainer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore a trainer built from meta["config"] to the saved state (weights, optimizer, generator, VSD copy)."""
    def sub(prefix):
        return section(tensors, prefix)

    try:
        trainer.field.load_state_dict(sub("field."))
        trainer.background.load_state_dict(sub("background."))
        if trainer.occupancy is not None and sub("occupancy."):
            trainer.occupancy.estimator.load_state_dict(sub("occupancy."))
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint tensors do not fit this configuration: {str(err)[:300]}") from None
    _load_optimizer(trainer.optimizer, tensors, "optim.", trainer.device)
    trainer.vsd = None
    if sub("vsd."):
        trainer.vsd = trainer.prior.vsd_copy()
        try:
            trainer.vsd.delta.load_state_dict(sub("vsd."))
        except RuntimeError as err:
            raise CheckpointError(f"the checkpoint's VSD copy does not fit the {trainer.prior.name} prior: "
                                  f"{str(err)[:200]}") from None
        _load_optimizer(trainer.vsd.optimizer, tensors, "vsd_optim.", trainer.device)
    if "generator" in tensors:
        trainer.generator.set_state(tensors["generator"])
    trainer.step_count = int(meta["step"])
    trainer.skipped_steps = int(meta.get("skipped_steps", 0))


def live_from_meta(meta: dict) -> LiveParams:
    """The live parameters saved in a checkpoint's meta (JSON lists back to tuples). Checkpoints written before
    the seed moved to the config and the step count to the live parameters are read too."""
    live = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["live"].items() if k != "seed"}
    if "steps" not in live and "steps" in meta.get("config", {}):
        live["steps"] = meta["config"]["steps"]
    return LiveParams(**live)


def restore(run_dir: str | Path, device="cpu", prior=None):
    """(trainer, live) continuing the run saved in run_dir, with the same optimizer and generator state.

    `prior` reuses an already loaded prior (the pane's); otherwise the checkpoint's prior is loaded.
    """
    from engine.priors import load_prior
    from engine.trainer import Trainer

    meta, tensors = read_checkpoint(run_dir)
    cfg, live = Config.from_dict(meta["config"]), live_from_meta(meta)
    trainer = Trainer(cfg, prior if prior is not None else load_prior(cfg.prior, device=device), device, live)
    load_into(trainer, meta, tensors)
    return trainer, live
