"""Evaluation: the classifier, the toy R-Precision and the silhouette score on perfect and wrong results."""

import pytest
import torch

from engine import evaluate as ev
from engine import world


def test_parse_prompt():
    assert ev.parse_prompt("a red cube, front view") == ("red", "cube")
    assert ev.parse_prompt("A grey BOX") == ("white", "cube")
    assert ev.parse_prompt("a dragon") == (None, None)


def test_silhouette_score_prefers_the_prompted_solid():
    clf = ev.Classifier().eval()
    good = ev.evaluate(ev.world_render_fn("cube", "red"), "a red cube", n_views=2, classifier=clf)
    assert {"colour_r_precision", "geometry_r_precision", "shape_score", "shape_margin"} <= set(good)
    assert good["shape_score"] > 0.85 and good["shape_margin"] > 0.02
    wrong = ev.evaluate(ev.world_render_fn("torus", "red"), "a red cube", n_views=2, classifier=clf)
    assert wrong["shape_score"] < 0.7 and wrong["shape_margin"] < 0
    empty = ev.evaluate(lambda c, lt, s: (torch.ones(len(c), 3, 32, 32), torch.zeros(len(c), 1, 32, 32)),
                        "a cone", n_views=2, classifier=clf)
    assert empty["shape_score"] == 0.0 and "colour_r_precision" not in empty
    assert empty["translucent_share"] == 0.0  # no foreground at all
    assert good["translucent_share"] < 0.5  # a solid: only its anti-aliased rim is partial
    cloud = ev.evaluate(lambda c, lt, s: (torch.ones(len(c), 3, 32, 32), torch.full((len(c), 1, 32, 32), 0.5)),
                        "a cone", n_views=2, classifier=clf)
    assert cloud["translucent_share"] == 1.0
    for r in (good, wrong, cloud):  # the votes account for every view, and the R-Precision is the prompted share
        assert sum(r["shape_votes"].values()) == 2
        assert r["geometry_r_precision"] == r["shape_votes"].get("cone" if r is cloud else "cube", 0) / 2


@pytest.mark.parametrize("width,strong", [(32, False), (16, True)])
def test_classifier_trains_and_saves(tmp_path, width, strong):
    model, acc = ev.train_classifier(n_images=48, epochs=1, out=tmp_path / "c.safetensors", batch=16, width=width,
                                     strong_aug=strong)
    assert 0.0 <= acc["shape"] <= 1.0 and 0.0 <= acc["shape_textureless"] <= 1.0
    again = ev.load_classifier(tmp_path / "c.safetensors")  # the width is read from the weights
    assert again.features[0].out_channels == width
    x = torch.rand(2, 3, 48, 48)
    assert torch.allclose(model(x)[1], again(x)[1], atol=0.05)


def test_strong_augmentation_changes_shading_but_keeps_range():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    y = ev._augment(x.clone(), torch.Generator().manual_seed(1), strong=True)
    z = ev._augment(x.clone(), torch.Generator().manual_seed(1), strong=False)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, z)  # the gain field, contrast and brightness did something


def test_save_grid(tmp_path):
    ev.save_grid(torch.rand(5, 3, 8, 8), tmp_path / "g.png", nrow=3)
    assert (tmp_path / "g.png").stat().st_size > 0


@pytest.mark.skipif(not ev.CLASSIFIER.exists(), reason="no shipped classifier in assets/")
def test_shipped_classifier_names_colour_and_shape(generator):
    clf = ev.load_classifier()
    sc = world.sample_scenes(48, generator)
    imgs, _ = world.render_scenes(sc)
    lc, ls = clf(imgs)
    shapes = torch.tensor([world.SHAPES.index(s) for s in sc["shapes"]])
    colors = torch.tensor([list(world.COLORS).index(c) for c in sc["colors"]])
    coloured = torch.tensor([m != "textureless" for m in sc["shading"]])
    assert (ls.argmax(1) == shapes).float().mean() > 0.8
    assert (lc.argmax(1) == colors)[coloured].float().mean() > 0.8
    perfect = ev.evaluate(ev.world_render_fn("house", "blue"), "a blue house", n_views=8, classifier=clf)
    assert perfect["colour_r_precision"] >= 0.75 and perfect["geometry_r_precision"] >= 0.75


def test_caption_votes_count_every_sample(tmp_path):
    """prior-samples --captions: n samples per caption, every one counted once for shape and for colour."""
    import json

    from engine.priors.embedded import EmbeddedModel

    model = EmbeddedModel(json.loads('{"block_out_channels": [8, 16, 16], "text_dim": 16, "num_train_timesteps": 100}'))
    out = ev.caption_votes(model.eval(), ["a red cube", "a red cube, front view"], n=3, steps=2,
                           classifier=ev.Classifier().eval())
    assert list(out) == ["a red cube", "a red cube, front view"]
    for votes in out.values():
        assert sum(votes["shape_votes"].values()) == 3 and sum(votes["colour_votes"].values()) == 3
        assert set(votes["shape_votes"]) <= set(ev.SHAPE_NAMES) and set(votes["colour_votes"]) <= set(ev.COLOR_NAMES)


def test_geometry_by_view_finds_the_views_where_a_perfect_mug_hides_its_handle():
    """The mug's handle points to +y (azimuth 90): from the other side it hides behind the body."""
    from engine.evaluate import geometry_by_view, world_render_fn

    res = geometry_by_view(world_render_fn("mug", "red"), "mug", n_views=192, seed=1000)
    ring = ("front", "side", "back", "overhead")
    assert sum(res[v]["n"] for v in ring) == res["all"]["n"] == 192
    assert res["side (azimuth > 0)"]["n"] + res["side (azimuth < 0)"]["n"] == res["side"]["n"]
    assert sum(res[v]["right"] for v in ring) == res["all"]["right"]
    hidden, front = res["side (azimuth < 0)"]["share"], res["front"]["share"]
    assert front >= 0.85 and res["side (azimuth > 0)"]["share"] >= 0.85 and hidden <= front - 0.15
