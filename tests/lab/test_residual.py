"""The prior's denoising residual of a run against the prompted solid (lab/residual.py)."""

from engine.checkpoint import save_checkpoint
from engine.config import LiveParams
from engine.presets import preset
from engine.priors import load_prior
from engine.trainer import Trainer
from lab.residual import residuals


def test_sds_residual_prefers_the_prompted_solid_to_a_fresh_blob(tmp_path):
    """The prior's denoising residual of the world's own cube is below that of an untrained field (a fuzzy
    blob), shaded and textureless: the diagnostic can tell a better image."""
    live = LiveParams(prompt="a red cube")
    trainer = Trainer(preset("embedded"), load_prior("embedded"), live=live)
    save_checkpoint(trainer, tmp_path, live)
    out = residuals(tmp_path, views=8, draws=2)
    assert out["prompt"] == "a red cube"
    for shading in ("lambertian", "textureless"):
        assert 0 < out[f"{shading}_solid"] < out[f"{shading}_run"]
