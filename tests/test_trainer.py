"""The training loop: repeatability, live changes, non-finite gradients, the headless CLI."""

import copy
import json

import pytest
import torch

from engine.__main__ import main
from engine.config import Config, LiveParams
from engine.priors import load_prior
from engine.priors.analytic import OraclePrior
from engine.trainer import Trainer


def small_config(**kw) -> Config:
    cfg = Config(prior="oracle:sphere", **kw)
    cfg.render.resolution = 16
    cfg.render.num_samples = 24
    cfg.render.occupancy_warmup = 4
    cfg.render.occupancy_every = 2
    cfg.camera.batch_size = 1
    cfg.shading.albedo_only_steps = 2
    return cfg


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
    assert all(g["lr"] == pytest.approx(0.005 * g["lr_scale"]) for g in tr.optimizer.param_groups)
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


def test_grey_background_swap_draws_greys_at_its_rate():
    cfg = small_config()
    tr = Trainer(cfg, load_prior(cfg.prior))
    assert all(tr._step_background() is None for _ in range(20))  # off by default: the learned background
    tr.cfg.background.grey_prob = 0.5
    picks = [tr._step_background() for _ in range(400)]
    greys = torch.stack([p for p in picks if p is not None])
    assert 0.4 < len(greys) / len(picks) < 0.6
    assert torch.all(greys[:, 0:1] == greys) and greys.min() >= 0.25 and greys.max() <= 1.0
    assert greys[:, 0].std() > 0.15  # spread over 0.25-1, not one fixed grey
    tr.cfg.background.grey_range = (0.25, 0.65)
    greys = torch.stack([p for p in (tr._step_background() for _ in range(200)) if p is not None])
    assert greys.min() >= 0.25 and greys.max() <= 0.65 and greys.max() - greys.min() > 0.3


@pytest.mark.parametrize("blob, stays_on", [(80.0, True), (2.0, False)])
def test_early_stop_is_kept_only_while_it_pays(blob, stays_on, tmp_path):
    """Training renders try early ray termination every `early_stop_probe_every` steps and keep it while it
    drops enough samples: on for an opaque field, off (tried on probe steps only) for a translucent one.
    The decision is part of the checkpoint."""
    from engine.checkpoint import restore, save_checkpoint

    cfg = small_config()
    cfg.field.blob_density = blob
    cfg.render.early_stop_probe_every = 4
    tr = Trainer(cfg, load_prior(cfg.prior))
    live = LiveParams(prompt="a red sphere")
    used = [tr.step(live).metrics for _ in range(11)]
    tried = [m["step"] for m in used if m["early_stop"]]
    assert tried == ([4, 5, 6, 7, 8, 9, 10] if stays_on else [4, 8])  # from the occupancy warm-up on
    assert all(m["samples"] < m["occupied_samples"] for m in used if m["early_stop"]) == stays_on
    assert tr.early_stop_on == stays_on
    save_checkpoint(tr, tmp_path, live)
    resumed, _ = restore(tmp_path, prior=tr.prior)
    assert resumed.early_stop_on == stays_on
    assert resumed.step(live).metrics["early_stop"] == stays_on  # step 11: not a probe step


def test_view_blend_interpolates_or_takes_the_nearest_view():
    from engine.cameras import fixed_views

    cams = fixed_views([0.0, 30.0, 60.0, 170.0], [10.0, 10.0, 50.0, 80.0])
    cfg = small_config()
    soft = Trainer(cfg, load_prior(cfg.prior))._view_weights(cams)
    cfg.sds.view_blend = "nearest"
    hard = Trainer(cfg, load_prior(cfg.prior))._view_weights(cams)
    assert torch.allclose(soft.sum(-1), torch.ones(4)) and (soft.max(-1).values < 1).any()  # blends
    assert torch.equal(hard, torch.nn.functional.one_hot(soft.argmax(-1), 4).float())
    assert [int(i) for i in hard.argmax(-1)] == [0, 0, 1, 3]  # front, front, side (60° az), overhead
    cfg.sds.view_blend = "closest"
    with pytest.raises(ValueError, match="view_blend"):
        Trainer(cfg, load_prior(cfg.prior))


def test_normal_smoothness_penalises_ribbed_normals_and_trains():
    from engine.trainer import normal_smoothness

    flat = torch.zeros(1, 3, 16, 16)
    flat[:, 2] = 1.0
    ribbed = flat.clone()
    ribbed[:, 0, :, ::2] = 0.5  # stripes, as on the boxy SDS failures
    assert normal_smoothness(flat) == 0  # one channel of three jumps by 0.5 between every pair of columns:
    assert abs(normal_smoothness(ribbed) - 0.25 / 3) < 1e-6
    cfg = small_config()
    cfg.reg.normal_smoothness = 0.5
    m = run(cfg, 3).step(LiveParams(prompt="a red sphere")).metrics
    assert m["loss_normal_smoothness"] > 0 and not m["skipped"]


def test_grid_tv_prices_ribs_above_flat_faces_and_trains():
    from engine.trainer import grid_tv

    n, cell = 24, 2.0 / 23
    solid = torch.zeros(n, n, n)
    solid[6:18, 6:18, 6:18] = 50.0  # a box with flat faces
    ribbed = solid.clone()
    ribbed[6:18, 6:18, 6:18:2] = 5.0  # the same box, sliced into slabs: a waffle like the boxy SDS failures
    assert grid_tv(torch.full((n, n, n), 7.0), cell) < 2e-4  # constant: only the sqrt's epsilon
    assert grid_tv(ribbed, cell) > 1.5 * grid_tv(solid, cell) > 0
    d = solid.clone().requires_grad_()
    grid_tv(d, cell).backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0
    cfg = small_config()
    cfg.reg.density_tv = 2.0
    tr = run(cfg, 3)
    m = tr.step(LiveParams(prompt="a red sphere")).metrics
    assert m["loss_density_tv"] > 0 and not m["skipped"]
    assert "last_grid" not in tr.field.__dict__  # the step's grid (and its graph) is not kept after the step

    def broken(*args, **kwargs):
        raise RuntimeError("prior failed")

    tr.prior.sds_grad = broken
    with pytest.raises(RuntimeError, match="prior failed"):
        tr.step(LiveParams(prompt="a red sphere"))
    assert "last_grid" not in tr.field.__dict__  # not even when the step fails after its render:
    copy.deepcopy(tr.field)  # a snapshot deep-copies the field, which a non-leaf tensor would break


def test_band_window_opens_coarse_to_fine():
    from engine.field import band_window

    bands = 4
    closed, half, open_ = band_window(bands, 0.0), band_window(bands, 1.5), band_window(bands, float(bands))
    assert closed.shape == (3 + 6 * bands,)
    assert torch.equal(closed[:3], torch.ones(3)) and closed[3:].abs().max() == 0  # only x itself
    assert torch.allclose(open_, torch.ones_like(open_))
    sin_half = half[3:3 + 3 * bands].view(bands, 3)[:, 0]  # octave 0 open, octave 1 halfway, 2 and 3 closed
    assert torch.allclose(sin_half, torch.tensor([1.0, 0.5, 0.0, 0.0]), atol=1e-6)
    assert torch.equal(half[3:3 + 3 * bands], half[3 + 3 * bands:])  # sin and cos alike


def test_band_anneal_follows_the_step_and_survives_resume(tmp_path):
    from engine.checkpoint import restore, save_checkpoint

    cfg = small_config()
    cfg.field.band_anneal_steps = 6
    tr = run(cfg, 3)
    field = tr.field
    with torch.no_grad():
        field.progress = 0
        coarse = field.grid()
        field.progress = 3
        mid = field.grid()
        field.progress = 6
        full = field.grid()
        window = torch.zeros_like(field.features[0, 0, 0])
        window[:3] = 1.0
        raw = field.net(field.features * window)  # at step 0 the generator sees the coordinates alone
        assert torch.allclose(coarse[0, 0], field.activate_density(raw[..., 0], field.lattice), atol=1e-5)
        assert not torch.allclose(mid, full) and not torch.allclose(coarse, mid)
        field.cfg.band_anneal_steps = 0
        assert torch.equal(field.grid(), full)  # past the anneal every octave is open: no window at all
        field.cfg.band_anneal_steps = 6
    tr.step(LiveParams(prompt="a red sphere"))
    assert field.progress == 3  # the step sets the field's progress to its own step count
    save_checkpoint(tr, tmp_path, LiveParams(prompt="a red sphere"))
    resumed, _ = restore(tmp_path, prior=tr.prior)
    assert resumed.field.progress == tr.step_count == 4
