"""The embedded prior: tokenizer and warnings, save/load, SDS, sampling (its training: tests/lab/test_train_prior.py)."""

import pytest
import torch

from engine import world
from engine.priors.base import SDSContext
from engine.priors.embedded import DEFAULT_WEIGHTS, SAMPLE_CFG, EmbeddedPrior, Tokenizer, sample, vocabulary
from engine.sds import view_weights
from lab.world_data import caption


def test_tokenizer_maps_synonyms_and_reports_unknown_words():
    tok = Tokenizer()
    known, unknown = tok.words("A shiny red Box, front view!")
    assert known == ["a", "red", "cube", "front", "view"] and unknown == ["shiny"]
    ids = tok(["", "a red cube"])
    assert ids[0, 0] == 1 and ids[0, 1:].eq(0).all() and ids[1, 1:4].gt(1).all()
    assert "snowman" in vocabulary() and "house" in vocabulary()


def test_save_load_round_trip_and_protocol(tmp_path, tiny_embedded_model):
    model = tiny_embedded_model
    model.save(tmp_path / "embedded_prior.safetensors", {"steps": 0}, half=False)
    prior = EmbeddedPrior.load(tmp_path)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 50])
    s, p = model.encode(["a red cube", ""])
    assert torch.allclose(model(x, t, s, p), prior.model(x, t, s, p), atol=1e-5)
    assert prior.name == "embedded" and prior.resolution == 32 and prior.num_train_timesteps == 100

    emb = prior.encode_prompt("a glossy blue cube, front view", "wobbly")
    assert emb.cond.shape[0] == 4 and emb.uncond.shape[0] == 1
    assert any("glossy" in w and "wobbly" in w and "snowman" in w for w in emb.warnings)
    assert prior.encode_prompt("a blue cube").warnings == []
    for size, shading in ((32, "lambertian"), (64, "textureless")):
        images = torch.rand(3, 3, size, size)
        ctx = SDSContext(view_weights(torch.tensor([0.0, 90.0, 200.0]), torch.tensor([0.0, 30.0, 80.0])),
                         shading=shading)
        grad, info = prior.sds_grad(images, emb, ctx, guidance_scale=10.0, t_range=(0.02, 0.98),
                                    generator=torch.Generator().manual_seed(0))
        assert grad.shape == images.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert len(info["t"]) == 3


def test_view_dependent_off_conditions_on_the_plain_prompt(tiny_embedded_model):
    prior = EmbeddedPrior(tiny_embedded_model)
    emb = prior.encode_prompt("a blue cube")
    images = torch.rand(2, 3, 32, 32)

    def grad(azimuths, view_dependent):
        ctx = SDSContext(view_weights(torch.tensor(azimuths), torch.tensor([10.0, 10.0])), shading="albedo",
                         view_dependent=view_dependent)
        return prior.sds_grad(images, emb, ctx, guidance_scale=10.0, t_range=(0.3, 0.7),
                              generator=torch.Generator().manual_seed(0))[0]

    # with view prompts the camera's azimuth changes the text and so the gradient; without, it cannot
    assert not torch.allclose(grad([0.0, 0.0], True), grad([180.0, 180.0], True))
    assert torch.equal(grad([0.0, 0.0], False), grad([180.0, 180.0], False))
    assert emb.plain.shape[0] == 1 and not torch.allclose(emb.plain, emb.cond[:1])


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m lab.train_prior"):
        EmbeddedPrior.load(tmp_path / "nothing.safetensors")


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="no shipped embedded prior in assets/")
def test_shipped_prior_draws_what_it_is_asked():
    from engine.evaluate import CLASSIFIER, load_classifier

    if not CLASSIFIER.exists():
        pytest.skip("no shipped classifier")
    prior, clf = EmbeddedPrior.load(), load_classifier()
    pairs = [("red", "cube"), ("blue", "sphere"), ("green", "cone"), ("yellow", "torus"), ("purple", "cylinder"),
             ("orange", "house"), ("pink", "snowman"), ("white", "mug")]
    imgs = sample(prior.model, [caption(s, c) for c, s in pairs], SAMPLE_CFG, 20, torch.Generator().manual_seed(0))
    lc, ls = clf(imgs)
    colour_ok = (lc.argmax(1) == torch.tensor([list(world.COLORS).index(c) for c, _ in pairs])).float().mean()
    shape_ok = (ls.argmax(1) == torch.tensor([world.SHAPES.index(s) for _, s in pairs])).float().mean()
    # chance is 1/8; the shipped weights score colour 1.00 / shape 0.91 on 4 draws of all 64 captions at SAMPLE_CFG
    # (assets/MODEL_CARD.md); these 8 draws (seed 0, 20 DDIM steps) must get most colours and shapes right.
    assert colour_ok >= 0.75 and shape_ok >= 0.5, (colour_ok, shape_ok)


def test_sample_takes_text_encodings_and_blends_them(tiny_embedded_model):
    """sample(text=...) is sampling from given encodings: the captions' own give the captions' samples, and a
    blend of two views' (what `python -m lab.view_blend` measures) gives something else, from the same noise."""
    model = tiny_embedded_model
    caps = ["a red mug, front view", "a red mug, side view"]

    def draw(text=None):
        return sample(model, caps, 3.0, 4, torch.Generator().manual_seed(1), text=text)

    front, side = (model.encode([c]) for c in caps)
    assert torch.allclose(draw(), draw(model.encode(caps)), atol=1e-5)  # (the transformer's no-grad fast path rounds apart)
    blend = tuple(0.5 * f + 0.5 * s for f, s in zip(front, side, strict=True))
    mixed = draw(tuple(t.expand(2, *t.shape[1:]) for t in blend))
    assert mixed.shape == (2, 3, 32, 32) and not torch.allclose(mixed, draw(), atol=1e-4)
