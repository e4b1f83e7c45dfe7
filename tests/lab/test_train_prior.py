"""Training the embedded prior (lab/train_prior.py): seeded, resumable, exported; its data draws pinned."""

import json

import torch

from engine.priors.embedded import EmbeddedPrior
from lab.train_prior import draw_captions, parse_args, render_batch, run


def _train(tmp_path, config: dict, steps: int, name: str = "run", *extra: str) -> dict:
    args = parse_args(["--out", str(tmp_path / name), "--steps", str(steps), "--seed", "0", "--batch", "8",
                       "--pool", "24", "--refresh", "1", "--lr", "3e-3", "--threads", "1", "--config", json.dumps(config),
                       *extra])
    return run(args)


def test_training_loss_falls_is_seeded_resumes_and_exports(tmp_path, tiny_embedded_config):
    a = _train(tmp_path, tiny_embedded_config, 40, "a")
    first, last = sum(a["losses"][:8]) / 8, sum(a["losses"][-8:]) / 8
    assert last < 0.8 * first, (first, last)
    # same seed, same run: the learning rate is still warming up, so a shorter run is a's first steps exactly
    b = _train(tmp_path, tiny_embedded_config, 12, "b")
    assert b["losses"] == a["losses"][:12]
    c = _train(tmp_path, tiny_embedded_config, 45, "a", "--export", str(tmp_path / "out"), "--grid-steps", "2")
    assert c["step"] == 45 and len(c["losses"]) == 5  # resumed from a's checkpoint
    prior = EmbeddedPrior.load(tmp_path / "out")
    assert prior.resolution == 32 and (tmp_path / "out" / "embedded_samples.png").stat().st_size > 0
    meta = json.loads((tmp_path / "out" / "embedded_prior.json").read_text())
    assert meta["steps"] == 45 and meta["shape_weights"] == {"cube": 1.5, "house": 1.2, "mug": 1.5}


def test_data_draws_are_those_the_shipped_weights_were_trained_on():
    """The pool's renders and captions draw the same random numbers as the code that trained the shipped
    weights (before the unshipped --empty and --shape-weights levers were removed): recorded from it, seed 0."""
    g = torch.Generator().manual_seed(0)
    batch = render_batch(6, g)
    assert batch["img"].shape == (6, 3, 32, 32) and batch["img"].dtype == torch.uint8
    assert batch["shape"] == ["snowman", "mug", "cone", "snowman", "mug", "house"]
    assert list(batch["color"]) == ["blue", "white", "pink", "red", "red", "blue"]
    assert list(batch["view"]) == ["back", "back", "front", "overhead", "side", "overhead"]
    assert list(batch["shading"]) == ["albedo", "albedo", "albedo", "lambertian", "albedo", "albedo"]
    assert draw_captions(batch, [0, 1, 2, 3, 4, 5, 0, 1], g) == [
        "a blue snowman, back view", "a white mug, back view", "a pink cone", "a red snowman, overhead view",
        "a red mug", "a blue house, overhead view", "a blue snowman, back view", "a white mug"]
    assert torch.randint(1 << 30, (1,), generator=g).item() == 165255019  # nothing else was drawn

