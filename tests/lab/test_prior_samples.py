"""The prior's own samples, classified (lab/prior_samples.py)."""

import torch

from engine.evaluate import COLOR_NAMES, SHAPE_NAMES, Classifier
from lab.prior_samples import caption_votes, prior_sample_accuracy, save_grid


def test_caption_votes_count_every_sample(tiny_embedded_model):
    """--captions: n samples per caption, every one counted once for shape and for colour."""
    out = caption_votes(tiny_embedded_model, ["a red cube", "a red cube, front view"], n=3, steps=2,
                        classifier=Classifier().eval())
    assert list(out) == ["a red cube", "a red cube, front view"]
    for votes in out.values():
        assert sum(votes["shape_votes"].values()) == 3 and sum(votes["colour_votes"].values()) == 3
        assert set(votes["shape_votes"]) <= set(SHAPE_NAMES) and set(votes["colour_votes"]) <= set(COLOR_NAMES)


def test_sample_accuracy_covers_every_caption_and_draws_a_grid(tmp_path, tiny_embedded_model):
    res = prior_sample_accuracy(tiny_embedded_model, n_per_caption=1, steps=2, classifier=Classifier().eval(),
                                grid=tmp_path / "grid.png")
    assert res["n"] == len(COLOR_NAMES) * len(SHAPE_NAMES) and set(res["per_shape"]) == set(SHAPE_NAMES)
    assert 0 <= res["both"] <= min(res["colour"], res["shape"]) <= 1
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_save_grid(tmp_path):
    save_grid(torch.rand(5, 3, 8, 8), tmp_path / "g.png", nrow=3)
    assert (tmp_path / "g.png").stat().st_size > 0
