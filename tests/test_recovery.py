"""Recovery from faults: skipped non-finite steps, rollback to the last good state, checkpoint on shutdown."""

from __future__ import annotations

import torch

from engine.config import LiveParams
from engine.priors.analytic import OraclePrior
from engine.trainer import Trainer


class FlakyPrior(OraclePrior):
    """The oracle, except that its gradient is NaN on the steps in `bad`."""

    def __init__(self, solid: str, bad: range):
        super().__init__(solid)
        self.bad = bad

    def sds_grad(self, images, emb, ctx, **kw):
        grad, info = super().sds_grad(images, emb, ctx, **kw)
        return (grad * float("nan") if ctx.step in self.bad else grad), info


def state(tr: Trainer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*tr.field.state_dict().values(), *tr.background.state_dict().values()]]


def test_repeated_non_finite_steps_roll_back_to_the_last_good_state(tiny_config):
    cfg = tiny_config().with_settings({"sds.good_state_every": 3, "sds.rollback_after": 4})
    tr = Trainer(cfg, FlakyPrior("sphere", range(7, 7 + 4)))
    live = LiveParams(prompt="a red sphere")
    kept = None
    for _ in range(7):  # good steps 0..6: copies after the 1st and the 4th and 7th good steps
        tr.step(live)
        if tr._good_age == 0:
            kept = state(tr)
    assert tr._good is not None and kept is not None
    for _ in range(3):
        m = tr.step(live).metrics
        assert m["skipped"] and m["rollbacks"] == 0
    m = tr.step(live).metrics  # the 4th skipped step in a row restores the copy
    assert m["skipped"] and m["rollbacks"] == 1 and m["skipped_steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(kept, state(tr)))
    m = tr.step(live).metrics  # and training carries on from it
    assert not m["skipped"] and m["loss"] == m["loss"]


def test_rollback_restores_an_older_copy_not_the_latest_weights(tiny_config):
    cfg = tiny_config().with_settings({"sds.good_state_every": 100, "sds.rollback_after": 2})
    tr = Trainer(cfg, FlakyPrior("sphere", range(5, 7)))
    live = LiveParams(prompt="a red sphere")
    tr.step(live)
    first = state(tr)  # the copy is taken after the first good step
    for _ in range(4):
        tr.step(live)
    assert any(not torch.equal(a, b) for a, b in zip(first, state(tr)))
    tr.step(live), tr.step(live)
    assert tr.rollbacks == 1 and all(torch.equal(a, b) for a, b in zip(first, state(tr)))


def test_keeping_good_state_leaves_seeded_runs_bit_identical(tiny_config):
    a_cfg = tiny_config(seed=5)
    b_cfg = a_cfg.with_settings({"sds.good_state_every": 1, "sds.rollback_after": 0})
    a, b = Trainer(a_cfg, OraclePrior("sphere")), Trainer(b_cfg, OraclePrior("sphere"))
    for _ in range(3):
        a.step(LiveParams(prompt="a red sphere")), b.step(LiveParams(prompt="a red sphere"))
    assert a._good is not None and b._good is None
    assert all(torch.equal(x, y) for x, y in zip(state(a), state(b)))


def test_shutdown_checkpoints_a_dirty_run_once(tmp_path, tiny_config, wait_for):
    from engine.checkpoint import read_checkpoint
    from playground.session import Session

    s = Session(tiny_config("oracle:cube"), LiveParams(steps=10_000), out_root=tmp_path)
    assert s.save_if_dirty() is None  # nothing trained
    s.start()
    wait_for(lambda: s.step >= 2, what="steps")
    s.pause()
    s.stop()
    run_dir = s.save_if_dirty()
    assert run_dir is not None and run_dir.is_relative_to(tmp_path)
    meta, _ = read_checkpoint(run_dir)
    assert meta["step"] == s.step
    assert s.save_if_dirty() is None  # clean now


def test_session_status_counts_skipped_steps_and_rollbacks(tmp_path, tiny_config, wait_for):
    from playground.panel import status_markdown
    from playground.session import Session

    cfg = tiny_config("oracle:cube").with_settings({"sds.good_state_every": 2, "sds.rollback_after": 3})
    s = Session(cfg, LiveParams(steps=10_000), out_root=tmp_path)
    s.priors.loaded["oracle:cube"] = FlakyPrior("cube", range(4, 7))  # steps 4-6 non-finite: 3 skipped, 1 rollback
    try:
        assert s.status()["skipped_steps"] == 0 and s.status()["rollbacks"] == 0
        s.start()
        wait_for(lambda: s.step >= 9, what="steps past the bad ones")
        st = s.status()
        assert st["skipped_steps"] == 3 and st["rollbacks"] == 1 and st["state"] == "running"
        assert "skipped 3 non-finite steps, 1 rollbacks" in status_markdown(st)
    finally:
        s.stop()
