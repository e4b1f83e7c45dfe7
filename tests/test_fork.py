"""Two runs side by side (fork), the live score, and exports racing a reset: the session with the oracle prior
at tiny size, and the pane's pure helpers (loss smoothing, example prompts)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from engine.config import LiveParams
from engine.priors import load_prior
from engine.testing import tiny_config as _tiny_config
from engine.testing import wait_for
from engine.trainer import Trainer
from playground.runs import fork_trainer
from playground.session import ExportRefused, Session


@pytest.fixture
def session(tmp_path):
    s = Session(_tiny_config("oracle:cube"), LiveParams(steps=10_000), out_root=tmp_path, score_every_s=0)
    yield s
    s.stop()


def test_a_forked_trainer_is_a_deep_copy_that_goes_on_as_the_original_would():
    cfg = _tiny_config("oracle:cube")
    live = LiveParams(prompt="a red cube")
    a = Trainer(cfg, load_prior(cfg.prior), "cpu", live)
    for _ in range(4):
        a.step(live)
    b = fork_trainer(a, live)
    assert b.step_count == a.step_count and b.prior is a.prior
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    for pa, pb in zip(a.field.parameters(), b.field.parameters()):
        assert torch.equal(pa, pb) and pa.data_ptr() != pb.data_ptr()
    for _ in range(3):  # the same live parameters: the same steps, bit for bit
        ma, mb = a.step(live).metrics, b.step(live).metrics
        assert ma["loss"] == mb["loss"]
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.field.parameters(), b.field.parameters()))
    b.step(live.replace(learning_rate=0.05))  # B's steps never touch A
    assert not all(torch.equal(pa, pb) for pa, pb in zip(a.field.parameters(), b.field.parameters()))


def test_fork_trains_a_and_b_in_turns_with_what_differs(session):
    with pytest.raises(ValueError, match="start a run first"):
        session.fork(guidance_scale=30.0)
    with pytest.raises(ValueError, match="no run B"):
        session.set_params(run="B", guidance_scale=30.0)
    session.start()
    wait_for(lambda: session.step >= 3, what="training")
    with pytest.raises(ValueError, match="guidance_scale"):
        session.fork(guidance_scale=-1.0)
    assert session.fork(guidance_scale=30.0).guidance_scale == 30.0
    session.wait_idle_queue()
    b = session.fork_run
    assert b is not None and b.trainer is not session.a.trainer and b.step >= 3
    a0, b0 = session.step, b.step
    st = wait_for(lambda: (x := session.status())["fork"]["step"] >= b0 + 3 and x, what="B's steps")
    assert st["step"] >= a0 + 2, "A trains in turns with B"
    assert st["fork"]["differs"] == {"guidance_scale": [10.0, 30.0]} and st["fork"]["name"] == "B"
    assert [r["name"] for r in st["runs"]] == ["A", "B"] and st["guidance_scale"] == 10.0  # top level: run A
    assert b.last_metrics["guidance_scale"] == 30.0 and session.a.last_metrics["guidance_scale"] == 10.0
    assert st["fork"]["loss"] is not None and st["fork"]["state"] == "running"

    session.set_params(run="B", shading="albedo")
    wait_for(lambda: session.status()["fork"]["live"]["shading"] == "albedo", what="B's new shading")
    assert session.status()["shading"] == "random", "a change to B leaves A alone"
    assert session.fork_run.last_metrics["shading"] == "albedo"

    session.close_fork()
    session.wait_idle_queue()
    st = session.status()
    assert st["fork"] is None and len(st["runs"]) == 1 and session.fork_run is None
    n = session.step
    wait_for(lambda: session.step > n + 2, what="A alone")


@pytest.mark.parametrize("loss,prior", [("csd", "oracle:cube"), ("vsd", "gaussian")])
def test_a_fork_compares_two_distillation_losses(tmp_path, loss, prior):
    """Another loss is just another live parameter: B runs it from A's state while A keeps SDS."""
    session = Session(_tiny_config(prior), LiveParams(steps=10_000), out_root=tmp_path, score_every_s=0)
    try:
        _fork_with_a_loss(session, loss)
    finally:
        session.stop()


def _fork_with_a_loss(session, loss):
    session.start()
    wait_for(lambda: session.step >= 2)
    session.fork(distillation=loss)
    st = wait_for(lambda: (x := session.status())["fork"] and x["fork"]["loss"] is not None
                  and x["fork"]["step"] > x["step"] - 1 and x, what="B's steps")
    assert st["fork"]["differs"] == {"distillation": ["sds", loss]}
    assert session.fork_run.last_metrics["distillation"] == loss and session.a.last_metrics["distillation"] == "sds"
    if loss == "vsd":  # a fork of a VSD run gets its own copy of the trainable prior copy
        session.set_params(distillation="vsd")
        wait_for(lambda: session.a.trainer.vsd is not None, what="A's VSD copy")
        session.fork()
        session.wait_idle_queue()
        b = session.fork_run.trainer
        assert b.vsd is not None and b.vsd is not session.a.trainer.vsd
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(b.vsd.delta.parameters(),
                                                                session.a.trainer.vsd.delta.parameters()))


def test_a_failing_fork_is_closed_and_run_a_goes_on(session):
    session.start()
    wait_for(lambda: session.step >= 2)
    session.fork(distillation="vsd")  # the oracle prior cannot run vsd: B's first step fails
    st = wait_for(lambda: (x := session.status())["fork"] is None and x["warnings"] and x, what="B closed")
    assert any(w.startswith("run B closed: its step") and "vsd" in w for w in st["warnings"])
    assert st["state"] == "running" and st["error"] is None
    n = session.step
    wait_for(lambda: session.step > n + 2, what="A goes on")


def test_closing_the_app_saves_both_runs(tmp_path):
    s = Session(_tiny_config("oracle:cube"), LiveParams(steps=10_000), out_root=tmp_path, score_every_s=0)
    s.start()
    wait_for(lambda: s.step >= 2)
    s.fork(guidance_scale=20.0)
    wait_for(lambda: s.fork_run is not None and s.fork_run.last_metrics, what="B's first step")
    s.pause()
    s.stop()
    first = s.save_if_dirty()
    assert first is not None and first.name.endswith("-A")
    assert sorted(p.name[-2:] for p in tmp_path.iterdir() if (p / "checkpoint.json").is_file()) == ["-A", "-B"]


def test_exports_name_their_run_and_a_reset_closes_the_fork(session, tmp_path):
    session.start()
    wait_for(lambda: session.step >= 2)
    session.fork(learning_rate=0.02)
    session.wait_idle_queue()
    b = session.export("snapshot", run="B", size=16).result(timeout=60)
    a = session.export("checkpoint", run="A").result(timeout=60)
    assert Path(b["png"]).parent.name.endswith("-B") and Path(b["png"]).is_file()
    assert Path(a["checkpoint"]).name.endswith("-A")
    wait_for(lambda: any(e.startswith("snapshot of run B: ") for e in session.status()["exports"]), what="report")
    session.reset()
    session.wait_idle_queue()
    assert session.status()["fork"] is None and "run B closed" in session.status()["message"]
    with pytest.raises(ValueError, match="no run B"):
        session.export("snapshot", run="B")


def _blocked_worker(session):
    """Hold the session's worker thread until the returned event is set (an export then queues behind it)."""
    gate = threading.Event()
    session.worker.submit(gate.wait, 30)
    return gate


@pytest.mark.parametrize("switch", ["reset", "prior switch", "fork closed"])
def test_an_export_overtaken_by_a_reset_is_refused_in_a_sentence(session, switch):
    session.start()
    wait_for(lambda: session.step >= 2)
    run = "A"
    if switch == "fork closed":
        session.fork(guidance_scale=20.0)
        session.wait_idle_queue()
        run = "B"
    gate = _blocked_worker(session)
    futures = [session.export(kind, run=run) for kind in ("checkpoint", "snapshot")]
    {"reset": session.reset, "prior switch": lambda: session.reset(prior="oracle:sphere"),
     "fork closed": session.close_fork}[switch]()
    session.wait_idle_queue(30)
    gate.set()
    for f in futures:
        with pytest.raises(ExportRefused, match=r"^nothing was written: run [AB] was .* press Export again"):
            f.result(timeout=60)
    st = wait_for(lambda: len((x := session.status())["exports"]) >= 2 and x, what="the reports")
    assert all("nothing was written" in e and "Error" not in e for e in st["exports"][-2:])


def test_exports_around_a_reset_complete_or_are_refused_never_an_attribute_error(session):
    session.start()
    wait_for(lambda: session.step >= 2)
    futures = []
    for i in range(6):
        futures.append(session.export("checkpoint"))
        (session.reset(prior="oracle:sphere" if i % 2 else "oracle:cube") if i % 3 else session.reset())
        futures.append(session.export("snapshot", size=16))
    session.wait_idle_queue(30)
    futures.append(session.export("checkpoint"))  # no reset after it: this one completes, however the race went
    outcomes = []
    for f in futures:
        try:
            outcomes.append(type(f.result(timeout=60)).__name__)
        except ExportRefused:
            outcomes.append("refused")
    assert set(outcomes) <= {"dict", "refused"} and outcomes[-1] == "dict"


def test_live_score_is_computed_off_the_training_thread(tmp_path, monkeypatch):
    from playground import score as score_module

    threads = []
    evaluate = score_module.evaluate

    def recording(*a, **k):
        threads.append(threading.current_thread().name)
        return evaluate(*a, **k)

    monkeypatch.setattr(score_module, "evaluate", recording)
    s = Session(_tiny_config("oracle:cube"), LiveParams(steps=10_000), out_root=tmp_path, score_every_s=0.2)
    try:
        assert s.status()["score"] is None
        s.start()
        st = wait_for(lambda: (x := s.status())["score"] and x, what="a live score")
        assert set(st["score"]) == {"step", "color_r_precision", "geometry_r_precision", "shape_score"}
        assert 0.0 <= st["score"]["color_r_precision"] <= 1.0 and st["score"]["step"] <= st["step"]
        assert 0.0 <= st["score"]["shape_score"] <= 1.0  # the silhouette IoU: it goes on moving once R-P is 1
        s.fork(guidance_scale=20.0)
        wait_for(lambda: (s.status()["fork"] or {}).get("score"), what="B's live score")
        assert threads and set(threads) == {"scorer"}
        assert s.scorer.costs  # each score is timed (bench/bench_latency.py reports the cost)
        s.set_params(prompt="a thing")  # names no colour and no shape: nothing more is scored
        s.close_fork()
        s.wait_idle_queue()
        wait_for(lambda: s.a.used.prompt == "a thing", what="the new prompt")
        n = len(threads)
        threading.Event().wait(0.6)
        assert len(threads) <= n + 1
    finally:
        s.stop()


def test_loss_curve_is_smoothed_over_the_faint_raw_one(session):
    import numpy as np
    import pandas as pd

    from playground.panel import LOSS_Y, SERIES_COLORS, loss_frame, loss_limits, smoothed

    assert smoothed([]) == []
    assert smoothed([4.0]) == [4.0], "debiased: the first point is not pulled towards 0"
    flat = smoothed([1.0] * 50)
    assert all(v == pytest.approx(1.0) for v in flat)
    noisy = [1.0 + (-1) ** i for i in range(200)]
    ema = smoothed(noisy)
    assert max(ema[100:]) - min(ema[100:]) < 0.25 < max(noisy) - min(noisy)
    assert smoothed([1.0, float("nan"), 1.0])[1] == pytest.approx(1.0)
    session.start()
    wait_for(lambda: session.step >= 4)
    df = loss_frame(session.runs)
    assert set(df["series"]) == {"A", "A raw"} and len(df) == 2 * (df["series"] == "A").sum()
    assert set(SERIES_COLORS) >= {"A", "A raw", "B", "B raw"}
    spike = pd.DataFrame([(i, 60.0 if i < 3 else 1.0 + 0.5 * (i % 2), "A raw") for i in range(100)],
                         columns=["step", "loss", "series"])
    both = pd.concat([spike, spike.assign(loss=smoothed(list(spike["loss"])), series="A")])
    both[LOSS_Y] = np.log10(both["loss"])
    lo, hi = loss_limits(both)
    assert -1 <= lo < 0 < hi <= 1, "log scale: the first steps' spike (60, 10^1.8) does not set the scale"
    vsd = both.assign(loss=both["loss"] * 1000, series=both["series"].str.replace("A", "B"))
    vsd[LOSS_Y] = np.log10(vsd["loss"])
    lo, hi = loss_limits(pd.concat([both, vsd]))
    assert lo < 0.2 and hi > 3.2, "a run 1000x larger (VSD beside SDS) does not flatten the other"
    assert loss_limits(loss_frame([])) is None


def test_one_click_on_an_example_prompt_starts_it(session):
    """How well the examples form is the SDS protocol's to say (bench/bench_sds_prompts.py --examples)."""
    from playground.panel import EXAMPLES, Panel

    assert Panel(session)._on_example(EXAMPLES[0]) == {"prompt": EXAMPLES[0], "message": ""}
    wait_for(lambda: session.status()["prompt"] == EXAMPLES[0] and session.state == "running", what="the example")


def test_a_run_forked_as_splats_steps_exactly_as_it_would_alone(tmp_path):
    """Fork as splats: run B is Gaussians drawn from A's NeRF with its own optimizer; A's steps stay bit for bit
    those of the same seeded run never forked (compared in this process)."""
    cfg, live = _tiny_config("oracle:cube"), LiveParams(prompt="a red cube", steps=6)
    s = Session(cfg, live, out_root=tmp_path, score_every_s=0)
    try:
        s.start()
        wait_for(lambda: s.step >= 2, what="A's first steps")
        s.pause()
        s.wait_idle_queue()
        assert s.fork(backbone="gaussians").guidance_scale == live.guidance_scale
        s.wait_idle_queue()
        b, a = s.fork_run, s.a
        assert b.trainer.field.rasterized and not a.trainer.field.rasterized and b.step == a.step
        assert len(b.trainer.field) == cfg.splats.init_count and b.trainer.optimizer is not a.trainer.optimizer
        drawn = b.trainer.field.means.clone()
        st = s.status()
        assert [(r["backbone"], r["gaussians"]) for r in st["runs"]] == [("grid", None), ("gaussians", 1024)]
        assert "as 1024 Gaussian splats drawn from its NeRF" in st["message"]
        s.resume()
        wait_for(lambda: s.state == "done", what="both runs' 6 steps")
        assert b.step == 6 and not torch.equal(b.trainer.field.means, drawn), "B trained"
    finally:
        s.stop()
    alone = Trainer(cfg, load_prior(cfg.prior), "cpu", live)
    for _ in range(6):
        alone.step(live)
    assert torch.equal(alone.generator.get_state(), a.trainer.generator.get_state())
    for module in ("field", "background"):
        mine, theirs = getattr(a.trainer, module).state_dict(), getattr(alone, module).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"A's {module} is not bit-identical"


def test_fork_as_splats_is_refused_in_a_sentence_where_it_cannot_be(session, monkeypatch):
    from playground import runs

    session.start()
    wait_for(lambda: session.step >= 2)
    with pytest.raises(ValueError, match="field must be 'nerf' or 'gaussians'"):
        session.fork(backbone="voxels")
    monkeypatch.setattr(runs, "splats_from_field", lambda *a, **k: (_ for _ in ()).throw(
        ValueError("the field is empty: there is nothing to draw Gaussians from")))
    session.fork(backbone="gaussians")
    session.wait_idle_queue()
    st = session.status()
    assert st["fork"] is None and st["state"] == "running" and st["error"] is None
    assert "fork as splats failed: the field is empty" in st["message"]
    monkeypatch.undo()
    session.reset(settings={"field.backbone": "gaussians"})
    session.wait_idle_queue()
    with pytest.raises(ValueError, match="run A is Gaussian splats: its fork is splats too"):
        session.fork(backbone="nerf")
    session.fork(backbone="gaussians", guidance_scale=20.0)  # splats of splats: a plain copy
    session.wait_idle_queue()
    b = session.fork_run
    assert b.trainer.field.rasterized and len(b.trainer.field) == len(session.a.trainer.field)
    n = b.step
    wait_for(lambda: b.step > n + 1 and session.fork_run is b, what="B's steps")


def test_the_pane_picks_the_field_and_forks_as_splats(session):
    """The pane's Field (a warning for a bad value), /start and /reset's backbone, and Fork's "as splats"."""
    from playground.panel import Panel
    from playground.texts import fork_markdown

    pane = Panel(session)
    assert pane.fields.field_value() == "nerf"
    assert pane.fields.on_field({"field": "gaussians"}) == {"message": ""}
    session.wait_idle_queue()
    assert pane.fields.field_value() == "gaussians" and session.status()["pending"] == {"field.backbone": "gaussians"}
    with pytest.warns(UserWarning, match="field must be"):  # gr.Warning, outside a request
        assert "field must be" in pane.fields.on_field({"field": "voxels"})["message"]
    pane.api_start(backbone="nerf")
    wait_for(lambda: session.step >= 2, what="the NeRF run")
    assert session.status()["settings"]["backbone"] == "grid" and pane.fields.field_value() == "nerf"
    assert pane.fields.on_fork({"fork_guidance": 20.0, "fork_loss": "sds", "fork_splats": True}) == {"message": ""}
    session.wait_idle_queue()
    st = session.status()
    assert st["fork"]["backbone"] == "gaussians" and st["fork"]["next"]["guidance_scale"] == 20.0
    assert "| **B** splats (1024) |" in fork_markdown(st) and "| **A** NeRF (grid) |" in fork_markdown(st)
    pane.api_fork(backbone="gaussians")  # the API's keyword: B replaced by fresh splats of A's current NeRF
    assert session.status()["fork"]["differs"] == {}
    pane.api_reset(backbone="gaussians")
    session.wait_idle_queue()
    assert session.status()["settings"]["backbone"] == "gaussians" and session.fork_run is None
