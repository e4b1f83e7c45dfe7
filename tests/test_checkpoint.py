"""Checkpoints: a seeded run resumed at step k ends bit-identical to an uninterrupted one; failed writes
leave nothing behind; broken checkpoints give clear messages; the CLI resumes and exports.

Runs are tiny (oracle prior, 16x16 renders, 16 samples per ray) with the occupancy grid switched on
from step 2, so its state and its randomness are part of what must resume exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import (
    META,
    WEIGHTS,
    CheckpointError,
    atomic_write,
    checkpoint_state,
    load_into,
    read_checkpoint,
    restore,
    save_checkpoint,
    write_checkpoint,
)
from engine.config import Config, LiveParams
from engine.priors import load_prior
from engine.trainer import Trainer

LIVE = LiveParams(prompt="a red sphere", shading="random")


def tiny_config() -> Config:
    return Config(prior="oracle:sphere", seed=3).with_settings({
        "render.resolution": 16, "render.num_samples": 16, "render.occupancy_resolution": 16,
        "render.occupancy_warmup": 2, "render.occupancy_every": 2, "shading.albedo_only_steps": 2})


@pytest.fixture(scope="module")
def prior():
    return load_prior("oracle:sphere")


def trained(prior, steps: int) -> Trainer:
    trainer = Trainer(tiny_config(), prior, live=LIVE)
    for _ in range(steps):
        trainer.step(LIVE)
    return trainer


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.field.state_dict().items(), b.field.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    for (name, x), (_, y) in zip(a.background.state_dict().items(), b.background.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(a.occupancy.estimator.occs, b.occupancy.estimator.occs)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert a.step_count == b.step_count


def test_resume_is_bit_identical(prior, tmp_path):
    k, m = 2, 2  # the occupancy grid's first random (sampled-cell) update falls at step 2, after the resume
    uninterrupted = trained(prior, k + m)
    first = trained(prior, k)
    save_checkpoint(first, tmp_path, LIVE)
    torch.rand(7)  # whatever else the process does with the global RNG must not matter
    resumed, live = restore(tmp_path, prior=prior)
    assert live == LIVE and resumed.step_count == k
    for _ in range(m):
        resumed.step(live)
    assert_same_state(uninterrupted, resumed)


def test_a_vsd_run_resumes_with_its_copy_of_the_prior(tmp_path):
    """VSD's trainable copy (and its Adam moments) is in the checkpoint: resumed at step k, a VSD run ends
    bit-identical to an uninterrupted one, copy included, instead of starting a fresh copy."""
    prior = load_prior("gaussian")
    live = LiveParams(prompt="a red sphere", distillation="vsd")
    cfg = tiny_config().with_settings({"prior": "gaussian"})

    def run(steps, trainer=None):
        trainer = trainer or Trainer(cfg, prior, live=live)
        for _ in range(steps):
            trainer.step(live)
        return trainer

    uninterrupted, first = run(4), run(2)
    save_checkpoint(first, tmp_path, live)
    assert any(n.startswith("vsd_optim.0.0.exp_avg") for n in load_file(tmp_path / WEIGHTS))
    resumed, _ = restore(tmp_path, prior=prior)
    assert resumed.vsd is not None and resumed.vsd is not first.vsd
    run(2, resumed)
    assert_same_state(uninterrupted, resumed)
    for (name, x), (_, y) in zip(uninterrupted.vsd.delta.state_dict().items(), resumed.vsd.delta.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name


def test_checkpoint_meta_and_tensors(prior, tmp_path):
    trainer = trained(prior, 1)
    save_checkpoint(trainer, tmp_path, LIVE)
    meta = json.loads((tmp_path / META).read_text())
    assert meta["step"] == 1 and meta["prompt"] == "a red sphere" and meta["seed"] == 3
    assert Config.from_dict(meta["config"]) == trainer.cfg
    assert meta["live"]["guidance_scale"] == LIVE.guidance_scale
    names = load_file(tmp_path / WEIGHTS).keys()
    assert "generator" in names and any(n.startswith("optim.0.0.exp_avg") for n in names)
    assert any(n.startswith("occupancy.") for n in names)


def test_state_taken_under_lock_is_a_copy(prior, tmp_path):
    trainer = trained(prior, 1)
    meta, tensors = checkpoint_state(trainer, LIVE)
    trainer.step(LIVE)  # training goes on before the snapshot is written
    write_checkpoint(tmp_path, meta, tensors)
    fresh = Trainer(tiny_config(), prior, live=LIVE)
    load_into(fresh, *read_checkpoint(tmp_path))
    assert fresh.step_count == 1
    assert not torch.equal(next(fresh.field.parameters()), next(trainer.field.parameters()))


def test_failed_write_leaves_no_partial_file(tmp_path):
    (tmp_path / "keep.json").write_text("old")

    def half(path):
        with open(path, "w") as f:
            f.write("{ half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        atomic_write(tmp_path / "keep.json", half)
    with pytest.raises(OSError, match="simulated"):
        atomic_write(tmp_path / "new.json", half)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    assert (tmp_path / "keep.json").read_text() == "old"  # the previous version survives


def test_broken_checkpoints_give_clear_errors(prior, tmp_path):
    with pytest.raises(CheckpointError, match="no run folder"):
        read_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(tmp_path)
    save_checkpoint(trained(prior, 0), tmp_path, LIVE)
    (tmp_path / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(tmp_path)
    (tmp_path / META).write_text("{")
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        read_checkpoint(tmp_path)


def test_cli_resume_and_export(tmp_path):
    from engine.__main__ import main

    common = ["--prior", "oracle:sphere", "--prompt", "../../a red sphere", "--resolution", "16", "--quiet"]
    assert main(["run", *common, "--steps", "1", "--out-root", str(tmp_path / "outputs")]) == 0
    (run_dir,) = (tmp_path / "outputs").iterdir()
    assert run_dir.name.endswith("-a-red-sphere")  # the prompt cannot climb out of the output root
    assert main(["run", "--resume", str(run_dir), "--steps", "2", "--quiet"]) == 0
    assert json.loads((run_dir / META).read_text())["step"] == 2
    assert main(["export", "--run", str(run_dir), "--gif", "t.gif", "--views", "2", "--size", "16",
                 "--mesh", "m.ply", "--mesh-resolution", "16", "--threshold", "1"]) == 0
    assert (run_dir / "t.gif").is_file() and (run_dir / "m.ply").is_file()
    assert main(["export", "--run", str(run_dir), "--gif", "../escape.gif"]) == 2
    assert not (tmp_path / "outputs" / "escape.gif").exists()
