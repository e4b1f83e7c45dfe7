"""The training loop: repeatability, live changes, non-finite gradients, the headless CLI."""

import json

import pytest
import torch

from engine.__main__ import main
from engine.config import Config, LiveParams
from engine.priors import load_prior
from engine.priors.analytic import OraclePrior
from engine.trainer import Trainer


def small_config(**kw) -> Config:
    return Config(prior="oracle:sphere", **kw).with_settings({
        "render.resolution": 16, "render.num_samples": 24, "render.occupancy_warmup": 4, "render.occupancy_every": 2,
        "camera.batch_size": 1, "shading.albedo_only_steps": 2})


def run(cfg: Config, steps: int, live: LiveParams | None = None) -> Trainer:
    tr = Trainer(cfg, load_prior(cfg.prior))
    for _ in range(steps):
        tr.step(live or LiveParams(prompt="a red sphere"))
    return tr


def test_seeded_runs_are_bit_identical_and_seeds_differ():
    a, b = run(small_config(seed=3), 8), run(small_config(seed=3), 8)
    c = run(small_config(seed=4), 8)
    for (k, va), vb in zip(a.field.state_dict().items(), b.field.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.field.state_dict().values(),
                                                         c.field.state_dict().values()))


def test_live_changes_take_effect_without_resetting_the_optimizer():
    tr = run(small_config(), 3)
    state_before = {id(p): s["step"].clone() for p, s in tr.optimizer.state.items()}
    m = tr.step(LiveParams(prompt="a blue sphere", guidance_scale=33.0, shading="textureless",
                           learning_rate=0.005)).metrics
    assert m["guidance_scale"] == 33.0 and m["shading"] == "textureless"
    assert all(g["lr"] == pytest.approx(0.005) for g in tr.optimizer.param_groups)
    for p, s in tr.optimizer.state.items():  # Adam's moments carried on
        assert s["step"] == state_before[id(p)] + 1
    assert ("a blue sphere", "") in tr._embeddings


class NaNPrior(OraclePrior):
    def sds_grad(self, images, emb, ctx, **kw):
        grad, info = super().sds_grad(images, emb, ctx, **kw)
        return grad * float("nan"), info


def test_non_finite_gradient_skips_the_step():
    cfg = small_config()
    tr = Trainer(cfg, NaNPrior("sphere"))
    before = [p.detach().clone() for p in tr.field.parameters()]
    m = tr.step(LiveParams(prompt="a red sphere")).metrics
    assert m["skipped"] and tr.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tr.field.parameters()))


def test_live_params_reject_bad_values_with_a_message():
    live = LiveParams()
    for bad in ({"guidance_scale": float("nan")}, {"guidance_scale": -1}, {"guidance_scale": 1e6},
                {"prompt": "   "}, {"shading": "toon"}, {"light_color": (1, 2)}, {"seed": -1}, {"ambient": 2.0},
                {"nonsense": 1}):
        with pytest.raises(ValueError) as err:
            live.replace(**bad)
        assert str(err.value)
    assert live.replace(guidance_scale=20).guidance_scale == 20


def test_cli_run_writes_metrics_checkpoint_and_preview(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--prompt", "a green cube", "--prior", "oracle:cube", "--steps", "3", "--resolution", "16",
               "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["its_per_s"] > 0 and metrics["config"]["prior"] == "oracle:cube"
    assert (out / "checkpoint.safetensors").stat().st_size > 1000
    from PIL import Image

    assert Image.open(out / "preview.png").size == (4 * 128, 128)
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--views", "2"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["prompt"] == "a green cube" and 0 <= scores["geometry_r_precision"] <= 1
    assert set(scores["silhouette_iou"]) >= {"cube", "sphere", "torus"}
    from safetensors.torch import save_file

    from engine.evaluate import Classifier

    save_file(Classifier(width=8).state_dict(), str(tmp_path / "clf.safetensors"))  # another classifier's verdict
    assert main(["eval", "--run", str(out), "--views", "2", "--classifier", str(tmp_path / "clf.safetensors")]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["shape_score"] == scores["shape_score"]  # the silhouettes do not depend on the classifier
    assert main(["eval", "--run", str(out), "--classifier", str(tmp_path / "none.safetensors")]) != 0
    assert "none.safetensors not found" in capsys.readouterr().err
    assert main(["run", "--prior", "nope", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown prior" in capsys.readouterr().err
    assert main(["run", "--prior", "oracle:cube", "--steps", "0", "--out", str(tmp_path / "y")]) == 2
    assert main(["run", "--prompt", "", "--prior", "oracle:cube", "--out", str(tmp_path / "z")]) == 2


def test_config_choices_are_checked_when_built_with_the_choices_named():
    from engine.config import BackgroundConfig, FieldConfig

    with pytest.raises(ValueError, match="'grid', 'hash'"):
        FieldConfig(backbone="hsh")
    with pytest.raises(ValueError, match="'mlp', 'solid'"):
        BackgroundConfig(kind="random")
    with pytest.raises(ValueError, match="field.backbone"):  # a setting is checked as it is applied
        small_config().with_settings({"field.backbone": "grd"})


def test_a_run_config_cannot_change_under_it():
    """Config is frozen: settings make a new copy, and runs built from one copy share nothing mutable."""
    import dataclasses

    cfg = small_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.render.resolution = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    other = cfg.with_settings({"render.resolution": 24, "seed": 4})
    assert (cfg.render.resolution, cfg.seed) == (16, 0) and (other.render.resolution, other.seed) == (24, 4)
    assert other.sds is cfg.sds  # untouched sections are shared, safely: nothing can write them
    with pytest.raises(ValueError, match="unknown setting 'render.nope'"):
        cfg.with_settings({"render.nope": 1})
    with pytest.raises(ValueError, match="seed must be an integer"):
        cfg.with_settings({"seed": -1}).validated()
    with pytest.raises(ValueError, match="unknown sds key"):
        Config.from_dict({"sds": {"t_mn": 0.1}})


def test_checkpoints_with_removed_levers_still_load(caplog):
    """A run saved before the dead levers were removed resumes: their keys are dropped with one warning."""
    d = small_config().to_dict()
    d["render"]["early_stop"], d["sds"]["view_blend"] = 1e-4, "interpolate"
    d["optim"] = {"betas": [0.9, 0.99], "eps": 1e-15, "weight_decay": 0.0, "grad_clip": 0.0, "background_lr_scale": 1.0}
    d["steps"] = 700  # the step count lived in the config then; engine.checkpoint.live_from_meta moves it
    cfg = Config.from_dict(d)
    assert cfg.render == small_config().render and "render.early_stop" in caplog.text


@pytest.mark.parametrize("prior,backbone", [("embedded", "grid"), ("oracle:cube", "hash")])
def test_a_seeded_run_twice_in_one_process_gives_the_same_whole_state(prior, backbone):
    """Weights, Adam moments, occupancy grid and generator, tensor for tensor, of the same seeded run done twice
    here, past the occupancy warm-up and through every shading mode, on one torch thread (the hash grid's
    backward adds into shared rows: with two threads the order of those float sums varies from run to run).
    Bits are compared within this process only: another CPU (AVX2 / AVX-512) or another torch may round
    differently, and that is no regression."""
    from engine.checkpoint import trainer_tensors
    from engine.presets import preset_run

    def whole_state(steps: int = 8) -> tuple[dict, float]:
        cfg, live = preset_run(prior, settings={
            "seed": 3, "field.backbone": backbone, "render.resolution": 12, "render.num_samples": 16,
            "camera.batch_size": 1, "field.hash_log2_size": 12, "render.occupancy_warmup": 4,
            "render.occupancy_every": 2, "shading.albedo_only_steps": 2, "live.prompt": "a red cube"})
        tr = Trainer(cfg, load_prior(prior), "cpu", live)
        for _ in range(steps):
            loss = tr.step(live).metrics["loss"]
        return trainer_tensors(tr), loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (a, loss_a), (b, loss_b) = whole_state(), whole_state()
        torch.rand(3)  # the global RNG between runs must not matter
        c, loss_c = whole_state()
    finally:
        torch.set_num_threads(threads)
    assert loss_a == loss_b == loss_c and a.keys() == b.keys() == c.keys()
    assert any(k.startswith("occupancy.") for k in a) and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
