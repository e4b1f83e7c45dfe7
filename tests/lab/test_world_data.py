"""The procedural world's training data (lab.world_data): scenes, their renders and captions."""

import torch

from engine import world
from lab.world_data import CONTRAST_GREY, caption, render_scenes, sample_scenes


def test_shaded_modes_and_scene_sampling(generator):
    sc = sample_scenes(12, generator)
    rgb, mask = render_scenes(sc, size=16)
    assert rgb.shape == (12, 3, 16, 16) and mask.shape == (12, 1, 16, 16)
    assert rgb.min() >= 0 and rgb.max() <= 1 and (mask.flatten(1).mean(1) > 0.01).all()
    assert set(sc["shading"]) <= {"albedo", "lambertian", "textureless"}


def test_captions_use_only_the_vocabulary():
    assert caption("cube", "red") == "a red cube"
    assert caption("mug", None, "front") == "a mug, front view"
    for text in (caption("snowman", "pink", "overhead"), caption("torus", "white", "back")):
        assert set(text.replace(",", "").split()) <= set(world.VOCABULARY)


def test_contrast_keeps_white_and_textureless_objects_off_white_backdrops():
    plain = sample_scenes(600, torch.Generator().manual_seed(0))
    sc = sample_scenes(600, torch.Generator().manual_seed(0), contrast=True)
    pale = torch.tensor([c == "white" or s == "textureless" for c, s in zip(sc["colors"], sc["shading"], strict=True)])
    bg = sc["background"][:, 0]
    lo, hi = CONTRAST_GREY
    assert pale.sum() > 100 and ((bg[pale] >= lo) & (bg[pale] <= hi)).all()
    assert (plain["background"][pale, 0] == 1.0).float().mean() > 0.3  # the old rule put them on white
    assert (bg[~pale] == 1.0).float().mean() > 0.3  # the others still see white half of the time
    assert sc["shapes"] == plain["shapes"] and sc["colors"] == plain["colors"]  # same scenes, other backdrops
