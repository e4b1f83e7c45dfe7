"""Evaluation: the classifier, the toy R-Precision and the silhouette score on perfect and wrong results.

Training the classifier is tested in tests/lab/test_classifier.py."""

import pytest
import torch

from engine import evaluate as ev
from engine import world
from lab.world_data import render_scenes, sample_scenes


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


@pytest.mark.skipif(not ev.CLASSIFIER.exists(), reason="no shipped classifier in assets/")
def test_shipped_classifier_names_colour_and_shape(generator):
    clf = ev.load_classifier()
    sc = sample_scenes(48, generator)
    imgs, _ = render_scenes(sc)
    lc, ls = clf(imgs)
    shapes = torch.tensor([world.SHAPES.index(s) for s in sc["shapes"]])
    colors = torch.tensor([list(world.COLORS).index(c) for c in sc["colors"]])
    coloured = torch.tensor([m != "textureless" for m in sc["shading"]])
    assert (ls.argmax(1) == shapes).float().mean() > 0.8
    assert (lc.argmax(1) == colors)[coloured].float().mean() > 0.8
    perfect = ev.evaluate(ev.world_render_fn("house", "blue"), "a blue house", n_views=8, classifier=clf)
    assert perfect["colour_r_precision"] >= 0.75 and perfect["geometry_r_precision"] >= 0.75


def test_missing_classifier_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m lab.classifier"):
        ev.load_classifier(tmp_path / "none.safetensors")
