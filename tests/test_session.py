"""Session: thread, state machine, live parameters, errors and renders, with the oracle prior at tiny size."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from engine.cameras import fixed_views
from engine.config import Config, LiveParams
from engine.priors import load_prior
from engine.testing import tiny_config as _tiny_config
from engine.testing import wait_for
from playground.session import Session
from playground.snapshot import RENDER_MODES


def tiny_config(prior: str = "oracle:cube") -> Config:
    return _tiny_config(prior)


@pytest.fixture
def session(tmp_path):
    s = Session(tiny_config(), LiveParams(steps=10_000), out_root=tmp_path)
    yield s
    s.stop()


def test_start_params_pause_resume_reset(session):
    session.start()
    wait_for(lambda: session.step >= 3, what="training steps")
    assert session.status()["state"] == "running"
    session.set_params(guidance_scale=20.0, shading="albedo", light_mode="fixed", light_azimuth=90.0,
                       light_color=(1.0, 0.5, 0.25), ambient=0.3, learning_rate=5e-3)
    before = session.step
    st = wait_for(lambda: (s := session.status())["guidance_scale"] == 20.0 and s, what="new guidance in status")
    assert st["shading"] == "albedo" and st["shading_used"] == "albedo"
    assert st["light_mode"] == "fixed" and st["light_azimuth"] == 90.0 and st["light_color"] == [1.0, 0.5, 0.25]
    assert st["step"] >= before, "a parameter change must not restart the run"
    opt = session.a.trainer.optimizer
    wait_for(lambda: session.step > before + 2, what="steps after the change")
    assert session.a.trainer.optimizer is opt and opt.param_groups[0]["lr"] == pytest.approx(5e-3)

    session.pause()
    wait_for(lambda: session.state == "paused", what="pause")
    paused_at = session.step
    time.sleep(0.3)
    assert session.step == paused_at and session.its_per_s() == 0.0
    session.resume()
    wait_for(lambda: session.step > paused_at, what="resume")

    session.reset()
    wait_for(lambda: session.step < paused_at, what="reset to a new field")
    assert session.state == "running"
    assert session.status()["guidance_scale"] == 20.0, "reset keeps the settings"


def test_bad_values_raise_and_the_run_goes_on(session):
    session.start()
    wait_for(lambda: session.step >= 1)
    for bad in ({"guidance_scale": -1}, {"shading": "shiny"}, {"prompt": ""}, {"colour": 1}, {"steps": 0}):
        with pytest.raises(ValueError):
            session.set_params(**bad)
    n = session.step
    wait_for(lambda: session.step > n + 1, what="training to go on")
    assert session.state == "running"


def test_prompt_change_is_encoded_on_the_session_thread(tmp_path):
    threads = []

    def loader(spec, device="cpu"):
        prior = load_prior(spec, device=device)
        encode = prior.encode_prompt

        def recording(prompt, negative_prompt=""):
            threads.append((prompt, threading.current_thread().name))
            return encode(prompt, negative_prompt)

        prior.encode_prompt = recording
        return prior

    s = Session(tiny_config(), LiveParams(steps=10_000), out_root=tmp_path, prior_loader=loader)
    try:
        s.start()
        wait_for(lambda: s.step >= 1)
        s.set_params(prompt="a blue sphere", negative_prompt="blurry")
        wait_for(lambda: s.status()["prompt"] == "a blue sphere", what="the new prompt to be used")
        assert ("a blue sphere", "session") in threads
        assert all(name == "session" for _, name in threads)
        assert s.status()["negative_prompt"] == "blurry"
    finally:
        s.stop()


def test_step_error_then_reset_recovers(tmp_path):
    fail = {"on": False}

    def loader(spec, device="cpu"):
        prior = load_prior(spec, device=device)
        grad = prior.sds_grad

        def flaky(*a, **k):
            if fail["on"]:
                raise RuntimeError("boom in the prior")
            return grad(*a, **k)

        prior.sds_grad = flaky
        return prior

    s = Session(tiny_config(), LiveParams(steps=10_000), out_root=tmp_path, prior_loader=loader)
    try:
        s.start()
        wait_for(lambda: s.step >= 1)
        fail["on"] = True
        st = wait_for(lambda: (x := s.status())["state"] == "error" and x, what="the error state")
        assert "boom in the prior" in st["error"] and "boom" in st["message"]
        fail["on"] = False
        s.reset()
        wait_for(lambda: s.state == "idle", what="reset out of error")
        assert s.status()["error"] is None and s.step == 0
        s.start()
        wait_for(lambda: s.step >= 2, what="training after recovery")
    finally:
        s.stop()


def test_missing_prior_is_reported_and_another_can_be_picked(tmp_path):
    def loader(spec, device="cpu"):
        if spec == "embedded":
            raise FileNotFoundError("assets/embedded_prior.safetensors is missing")
        return load_prior(spec, device=device)

    s = Session(tiny_config(prior="embedded"), LiveParams(steps=10_000), out_root=tmp_path, prior_loader=loader)
    try:
        s.start()
        st = wait_for(lambda: (x := s.status())["state"] == "error" and x, what="the error state")
        assert "embedded_prior.safetensors" in st["error"] and "Pick another prior" in st["error"]
        s.start(prior="oracle:sphere")
        wait_for(lambda: s.step >= 1, what="training with another prior")
        assert s.status()["prior"] == "oracle:sphere" and s.status()["error"] is None
    finally:
        s.stop()


def test_done_after_steps_and_extend(tmp_path):
    s = Session(tiny_config(), LiveParams(steps=10_000), out_root=tmp_path)
    try:
        s.set_params(steps=3)
        s.start()
        wait_for(lambda: s.state == "done", what="done")
        assert s.step == 3
        s.set_params(steps=5)
        s.start()
        wait_for(lambda: s.state == "done" and s.step == 5, what="the extended run")
    finally:
        s.stop()


def test_render_source_renders_every_mode_while_training(session):
    session.start()
    wait_for(lambda: session.step >= 2)
    snap = session.render_source()
    cams = fixed_views([30.0], [20.0])
    for mode in RENDER_MODES:
        img = snap.render(cams, 24, 20, mode, live=session.a.used)
        assert img.shape == (1, 3, 24, 20) and torch.isfinite(img).all()
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    fewer = snap.render(cams, 16, 16, "lambertian", live=session.a.used, samples=8)
    assert fewer.shape == (1, 3, 16, 16) and snap.with_samples(8).field is snap.source.field
    with pytest.raises(ValueError):
        snap.render(cams, 8, 8, "xray")
    wait_for(lambda: session.render_source().step > snap.step, what="a fresher copy")
    assert wait_for(lambda: session.preview(), what="a preview")[1].shape == (256, 256, 3)  # 2 × 2 views of 128 px


def test_exports_run_on_the_worker_and_report(session, tmp_path):
    session.start()
    wait_for(lambda: session.step >= 3)
    paths = session.export("snapshot", size=32).result(timeout=60)
    assert Path(paths["png"]).is_file() and Path(paths["png"]).parent.parent == tmp_path
    video = session.export("video", frames=4, size=32).result(timeout=60)
    assert Path(video["video"]).is_file()
    assert Path(session.export("checkpoint").result(timeout=60)["checkpoint"], "checkpoint.json").is_file()
    assert session.state == "running", "exports do not stop training"
    wait_for(lambda: len(session.status()["exports"]) == 3, what="export reports")
    with pytest.raises(ValueError):
        session.export("hologram")


def test_vocabulary_and_unknown_words_are_shown(tmp_path):
    def loader(spec, device="cpu"):
        prior = load_prior("oracle:cube", device=device)
        encode = prior.encode_prompt

        def flagging(prompt, negative_prompt=""):
            emb = encode(prompt, negative_prompt)
            emb.warnings = [f"the prior ignored {w!r}" for w in prompt.split() if w not in ("a", "red", "cube")]
            return emb

        prior.encode_prompt, prior.vocabulary = flagging, ["a", "red", "cube"]
        return prior

    from playground.texts import vocabulary_markdown

    s = Session(tiny_config(), LiveParams(steps=10_000), out_root=tmp_path, prior_loader=loader)
    try:
        s.start()
        wait_for(lambda: s.step >= 1)
        s.set_params(prompt="a red shiny cube")
        wait_for(lambda: s.status()["warnings"], what="the unknown word to be flagged")
        text = vocabulary_markdown(s.status(), s.vocabulary())
        assert "'shiny'" in text and "`cube`" in text
    finally:
        s.stop()


class _NamedPrior:
    """A cheap stand-in for a large prior (the Gaussian prior under another name), for switch tests."""

    def __new__(cls, spec, device="cpu"):
        prior = load_prior("gaussian", device=device)
        prior.name = spec
        return prior


def fake_large_loader(spec, device="cpu"):
    return _NamedPrior(spec, device) if spec.split(":")[0] in ("sd", "if") else load_prior(spec, device=device)


def test_a_prior_switch_applies_that_priors_settings_and_keeps_what_the_user_set(tmp_path):
    from engine.presets import live_defaults, preset

    s = Session(preset("embedded"), live_defaults("embedded"), out_root=tmp_path, prior_loader=fake_large_loader,
                overrides={"camera.batch_size": 1})
    try:
        s.set_params(prompt="a blue cone", shading="albedo")
        s.reset(prior="sd:/models/tiny")
        s.wait_idle_queue(60)
        st = s.status()
        assert st["prior"] == "sd:/models/tiny" and st["next"]["guidance_scale"] == 100.0  # SD's own guidance
        assert st["settings"]["resolution"] == 64 and st["steps"] == 10000 and st["settings"]["t_max_end"] == 0.98
        assert st["next"]["prompt"] == "a blue cone" and st["next"]["shading"] == "albedo"  # what the user set stays
        assert "guidance 100" in st["settings_note"] and "shading" in st["settings_note"]
        s.reset(prior="embedded")
        s.wait_idle_queue(60)
        st = s.status()
        assert st["next"]["guidance_scale"] == 10.0 and st["settings"]["resolution"] == 32
        assert st["settings"]["t_max_end"] == 0.5 and st["settings"]["entropy"] == 0.2 and st["steps"] == 2000
        assert st["settings"]["batch_size"] == 1 and st["next"]["prompt"] == "a blue cone"
        s.set_params(guidance_scale=12.0)
        s.reset(prior="embedded")  # the same prior: the user's guidance stays
        s.wait_idle_queue(60)
        assert s.status()["next"]["guidance_scale"] == 12.0
    finally:
        s.stop()


def test_switching_large_priors_keeps_only_one_loaded(tmp_path):
    import gc
    import weakref

    s = Session(tiny_config(), LiveParams(steps=10_000), out_root=tmp_path, prior_loader=fake_large_loader)
    try:
        s.reset(prior="sd:a")
        s.wait_idle_queue(60)
        first = weakref.ref(s.a.trainer.prior)
        s.reset(prior="if:b")
        s.wait_idle_queue(60)
        assert list(s.priors.loaded) == ["if:b"]
        gc.collect()
        assert first() is None, "the previous large prior is still referenced"
        s.reset(prior="oracle:cube")
        s.wait_idle_queue(60)
        assert "if:b" not in s.priors.loaded
    finally:
        s.stop()


def test_out_of_memory_in_a_step_pauses_with_what_to_lower(tmp_path):
    def loader(spec, device="cpu"):
        prior = load_prior(spec, device=device)

        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        prior.sds_grad = oom
        return prior

    s = Session(tiny_config(), LiveParams(steps=10_000), out_root=tmp_path, prior_loader=loader)
    try:
        s.start()
        st = wait_for(lambda: (x := s.status())["state"] == "paused" and x, what="the pause after OOM")
        assert "out of GPU memory" in st["message"] and "lower the resolution" in st["message"]
        assert st["error"] is None and s.a.trainer is not None  # nothing lost: the run can go on
    finally:
        s.stop()


def test_start_with_another_prior_while_running_says_what_it_did(session):
    session.start()
    wait_for(lambda: session.step >= 1)
    session.start(prior="oracle:sphere")
    session.wait_idle_queue()
    st = session.status()
    assert st["prior"] == "oracle:cube" and st["state"] == "running"
    assert any("oracle:sphere was not used" in w and "Reset" in w for w in st["warnings"])


def test_a_loss_the_prior_cannot_run_is_refused_when_set_and_the_run_goes_on(session):
    session.start()
    wait_for(lambda: session.step >= 1)
    with pytest.raises(ValueError, match="cannot run distillation 'vsd'"):
        session.set_params(distillation="vsd")  # the oracle's target changes with every camera: no VSD copy
    session.set_params(distillation="csd")
    before = session.step
    wait_for(lambda: session.status()["distillation"] == "csd" and session.step > before + 1, what="csd steps")
    assert session.state == "running"


def test_a_seeded_session_trains_the_bits_of_a_plain_trainer_loop(tmp_path):
    """The session thread steps the engine's trainer and nothing else: same config, live values and prior as a
    plain `Trainer` loop in this process, the same tensors after N steps (field, optimizer, grid, generator)."""
    from engine.checkpoint import trainer_tensors
    from engine.trainer import Trainer

    cfg, live = _tiny_config("oracle:cube", seed=7), LiveParams(prompt="a red cube", steps=6)
    s = Session(cfg, live, out_root=tmp_path, score_every_s=0)
    try:
        s.start()
        wait_for(lambda: s.state == "done", what="the seeded run's 6 steps")
        session_state = trainer_tensors(s.a.trainer)
    finally:
        s.stop()
    plain = Trainer(cfg, load_prior("oracle:cube"), "cpu", live)
    for _ in range(live.steps):
        plain.step(live)
    plain_state = trainer_tensors(plain)
    assert s.step == plain.step_count == 6 and session_state.keys() == plain_state.keys()
    assert [k for k in plain_state if not torch.equal(session_state[k], plain_state[k])] == []


def test_the_field_of_the_next_run_is_a_choice_nerf_by_default(tmp_path):
    """NeRF stays the default; Gaussian splats are picked for the next run (a pending setting, as the seed), shown
    in /status, and "nerf" is the backbone the prior's preset gives on the device. (The pane's Field and the API's
    backbone: tests/test_fork.py.)"""
    import types

    from playground import lifecycle

    s = Session(tiny_config(), LiveParams(steps=10_000), out_root=tmp_path, score_every_s=0)
    try:
        assert s.status()["settings"]["backbone"] == "grid"
        s.reset()  # an idle run at step 0: Start would go on with it, unless another field is picked
        s.next_run({"field.backbone": "gaussians"})
        s.wait_idle_queue()
        assert s.status()["pending"] == {"field.backbone": "gaussians"}
        s.start()
        wait_for(lambda: s.step >= 2, what="the splat run's steps")
        st = s.status()
        assert st["settings"]["backbone"] == "gaussians" and st["runs"][0]["gaussians"] == len(s.a.trainer.field)
        assert st["pending"] == {} and st["runs"][0]["backbone"] == "gaussians"
        with pytest.raises(ValueError, match="field must be 'nerf' or 'gaussians'"):
            s.next_run({"field.backbone": "voxels"})
        s.next_run({"field.backbone": "nerf"})  # while running: for the next run (Reset); this one goes on
        s.wait_idle_queue()
        assert s.a.trainer.field.rasterized and "applies to the next new run (Reset)" in s.message
        s.reset()
        s.wait_idle_queue()
        assert s.status()["settings"]["backbone"] == "grid" and s.state == "running"
        s.start(settings={"field.backbone": "splats"})  # while running: kept for the next run
        s.wait_idle_queue()
        assert s.status()["pending"] == {"field.backbone": "gaussians"} and not s.a.trainer.field.rasterized
        assert s.message == "field.backbone gaussians: applies to the next new run (Reset)"
    finally:
        s.stop()
    cuda = types.SimpleNamespace(cfg=Config(), device="cuda", overrides={})
    assert lifecycle.nerf_backbone(cuda, "sd") == "hash" and lifecycle.nerf_backbone(cuda, "embedded") == "grid"
    splats = types.SimpleNamespace(cfg=Config().with_settings({"field.backbone": "gaussians"}), device="cpu",
                                   overrides={"field.backbone": "hash"})
    assert lifecycle.nerf_backbone(splats, "embedded") == "hash"  # the command line's NeRF


def test_a_training_share_rests_between_steps_and_serves_commands_meanwhile(session):
    """train_util u: after a step of t s the thread rests t (1 - u) / u before the next, and a command queued
    during a rest is applied in it, not after. Refused values name the range; the run is untouched."""
    began: list[float] = []
    length = [0.05]

    def step():  # a step of known length in place of a training step
        began.append(time.monotonic())
        time.sleep(length[0])

    session._train_one = step
    assert session.status()["train_util"] == 1.0
    session.set_params(train_util=0.25)  # rest 0.15 s after each 0.05-s step
    session.start()
    wait_for(lambda: len(began) >= 4, what="steps")
    gaps = [b - a for a, b in zip(began, began[1:])]
    assert min(gaps) >= 0.2 - 1e-3, gaps
    assert session.status()["train_util"] == 0.25

    length[0] = 0.5
    session.set_params(train_util=0.05)  # rest 9.5 s after a 0.5-s step
    n = len(began)
    wait_for(lambda: len(began) >= n + 1 and time.monotonic() > began[-1] + 0.6, what="a rest at 0.05")
    steps = len(began)
    session.pause()
    session.wait_idle_queue(timeout=30)
    assert session.state == "paused" and len(began) == steps
    assert time.monotonic() < began[-1] + 0.5 + 9.5, "the pause waited for the rest to end"

    for bad in (0.0, 1.5, float("nan"), "fast"):
        with pytest.raises(ValueError, match="train_util"):
            session.set_params(train_util=bad, guidance_scale=30.0)
    assert session.train_util == 0.05 and session.a.live.guidance_scale != 30.0
