"""Presets and the one rule for a new run's settings (engine/presets.py): pure functions, no training."""

import pytest

from engine.config import Config, LiveParams
from engine.presets import EMBEDDED, new_run, preset, preset_run, preset_settings


def test_a_preset_is_dotted_settings_over_fresh_defaults():
    cfg, live = preset_run("embedded")
    assert cfg.prior == "embedded" and cfg.sds.t_max_end == EMBEDDED["sds.t_max_end"] != Config().sds.t_max_end
    assert (live.guidance_scale, live.steps) == (EMBEDDED["live.guidance_scale"], EMBEDDED["live.steps"])
    sd_cpu, sd_cuda = preset("sd:/models/x"), preset("sd:/models/x", "cuda")
    assert sd_cpu.render.resolution == 64 and sd_cpu.field.backbone == "grid" and sd_cuda.field.backbone == "hash"
    assert preset_run("if")[1].guidance_scale == 20.0 and preset_run("oracle:cube")[1].learning_rate == 0.03
    assert preset_settings("oracle:cube") == {"live.learning_rate": 0.03}
    cfg2, live2 = preset_run("embedded", settings={"seed": 7, "live.steps": 30, "render.resolution": 24})
    assert (cfg2.seed, live2.steps, cfg2.render.resolution) == (7, 30, 24)
    assert preset("embedded") == preset("embedded") and preset("embedded") is not preset("embedded")


def test_another_prior_gets_its_own_preset_and_keeps_the_prompt():
    current = preset_run("embedded", settings={"live.prompt": "a blue cone", "live.guidance_scale": 12.0,
                                               "seed": 4})
    run = new_run("sd:/models/tiny", current=current)
    assert run.cfg.prior == "sd:/models/tiny" and run.cfg.render.resolution == 64
    assert (run.live.guidance_scale, run.live.steps) == (100.0, 10000)  # its own, not the embedded run's
    assert run.live.prompt == "a blue cone" and run.cfg.seed == 0
    assert "sd settings" in run.note and "10000 steps" in run.note and "kept what you set" not in run.note


def test_what_the_user_set_since_the_last_run_wins_over_the_preset():
    current = preset_run("embedded")
    run = new_run("sd", current=current, overrides={"camera.batch_size": 2},
                  changes={"live.guidance_scale": 50.0, "seed": 9, "live.shading": "albedo"})
    assert run.live.guidance_scale == 50.0 and run.cfg.seed == 9 and run.live.shading == "albedo"
    assert run.cfg.camera.batch_size == 2 and run.live.steps == 10000
    assert "kept what you set: camera.batch_size, guidance_scale, seed, shading" in run.note


def test_the_same_kind_of_prior_goes_on_with_the_current_settings():
    current = preset_run("oracle:cube", settings={"live.guidance_scale": 12.0, "render.resolution": 20})
    run = new_run("oracle:sphere", current=current, changes={"seed": 2})
    assert run.cfg.prior == "oracle:sphere" and run.cfg.render.resolution == 20 and run.cfg.seed == 2
    assert run.live == current[1] and run.note == ""
    assert new_run("embedded").live == preset_run("embedded")[1]  # no current run: the preset


def test_a_bad_setting_is_named_and_nothing_is_built():
    current = preset_run("embedded")
    with pytest.raises(ValueError, match="unknown setting 'render.nope'"):
        new_run("sd", current=current, changes={"render.nope": 1})
    with pytest.raises(ValueError, match="guidance_scale must be a number"):
        new_run("embedded", current=current, changes={"live.guidance_scale": "x"})
    with pytest.raises(ValueError, match="seed must be an integer"):
        new_run("sd", current=current, changes={"seed": -3})
    with pytest.raises(ValueError, match="steps must be an integer"):
        LiveParams(steps=0).validated()
