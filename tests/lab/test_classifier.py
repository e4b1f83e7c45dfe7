"""Training the evaluation classifier (lab/classifier.py): it trains, saves and reloads; its augmentation."""

import pytest
import torch

from engine.evaluate import load_classifier
from lab.classifier import _augment, main, train_classifier


@pytest.mark.parametrize("width,strong", [(32, False), (16, True)])
def test_classifier_trains_and_saves(tmp_path, width, strong):
    model, acc = train_classifier(n_images=48, epochs=1, out=tmp_path / "c.safetensors", batch=16, width=width,
                                  strong_aug=strong)
    assert 0.0 <= acc["shape"] <= 1.0 and 0.0 <= acc["shape_textureless"] <= 1.0
    again = load_classifier(tmp_path / "c.safetensors")  # the width is read from the weights
    assert again.features[0].out_channels == width
    x = torch.rand(2, 3, 48, 48)
    assert torch.allclose(model(x)[1], again(x)[1], atol=0.05)


def test_cli_writes_where_asked_and_caches_the_renders(tmp_path, capsys):
    out, cache = tmp_path / "clf.safetensors", tmp_path / "runs" / "data.pt"  # runs/ need not exist yet
    argv = ["--images", "40", "--epochs", "1", "--width", "8", "--out", str(out), "--cache", str(cache)]
    first = main(argv)
    assert out.stat().st_size > 0 and cache.stat().st_size > 0 and '"shape"' in capsys.readouterr().out
    assert main(argv)["shape"] == pytest.approx(first["shape"], abs=0.3)  # from the cache (uint8 renders)


def test_strong_augmentation_changes_shading_but_keeps_range():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    y = _augment(x.clone(), torch.Generator().manual_seed(1), strong=True)
    z = _augment(x.clone(), torch.Generator().manual_seed(1), strong=False)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, z)  # the gain field, contrast and brightness did something
