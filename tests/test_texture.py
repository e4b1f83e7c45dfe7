"""Textured meshes (engine/texture.py) checked against the field they come from.

The reference is the field's own albedo render (RenderSource, shading "albedo"); the mesh is drawn from the
same 8 cameras by engine.testing.rasterize (a plain z-buffer with perspective-correct UVs). The solids are
the oracle's analytic ones (engine.priors.analytic) painted with smooth colour waves, so a texel baked at
the wrong point shows; their edge is sharp (eps 0.003) so that the render's silhouette is the surface's
(a soft edge fattens the rendered silhouette along grazing rays, and the IoU with it, not the mesh, drops).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from engine.export import export_textured_mesh
from engine.testing import mesh_vs_field, painted_source
from engine.texture import check_budget, clean, dilate

SHARP = dict(sigma_max=1000.0, eps=0.003)
FAST = dict(resolution=128)  # the marching-cubes lattice: 128^3 gives 30-50k faces here, above the 20k budget


@pytest.fixture(scope="module")
def sphere():
    return painted_source("sphere", **SHARP)


def load(path) -> trimesh.Trimesh:
    return trimesh.load(path, force="mesh", process=False)


def check_textured(mesh: trimesh.Trimesh, side: int, budget: int):
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    uv = np.asarray(mesh.visual.uv)
    assert uv.shape == (len(mesh.vertices), 2)
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    image = getattr(mesh.visual.material, "baseColorTexture", None) or mesh.visual.material.image
    assert image.size == (side, side)
    assert 0.5 * budget <= len(mesh.faces) <= budget


@pytest.mark.parametrize("solid", ["sphere", "cube", "torus"])
def test_glb_matches_the_field(solid, tmp_path):
    source = painted_source(solid, **SHARP)
    stats = export_textured_mesh(source, tmp_path / f"{solid}.glb", **FAST)  # the default budget: 20k, 1024^2
    assert stats["files"] == [tmp_path / f"{solid}.glb"] and set(stats["seconds"]) == {
        "marching_cubes", "clean", "decimate", "uv_atlas", "bake", "write"}
    mesh = load(tmp_path / f"{solid}.glb")
    check_textured(mesh, 1024, 20_000)
    solid_only = trimesh.Trimesh(mesh.vertices, mesh.faces)  # merges the vertices UV seams split
    assert solid_only.is_watertight and solid_only.volume > 0  # closed, normals out
    score = mesh_vs_field(source, mesh, size=64)
    assert score["iou"] >= 0.95, score
    assert score["psnr"] >= 25.0, score


def test_obj_mtl_png_read_back_and_match(sphere, tmp_path):
    stats = export_textured_mesh(sphere, tmp_path / "ball.obj", faces=4000, texture=256, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ball.mtl", "ball.obj", "ball.png"]
    assert stats["files"][0] == tmp_path / "ball.obj"
    assert "map_Kd ball.png" in (tmp_path / "ball.mtl").read_text()
    mesh = load(tmp_path / "ball.obj")
    check_textured(mesh, 256, 4000)
    score = mesh_vs_field(sphere, mesh, size=64, views=4)
    assert score["iou"] >= 0.95 and score["psnr"] >= 25.0, score


def test_a_constant_texture_would_fail(sphere, tmp_path):
    """The check can fail: the same mesh with its texture replaced by the mean colour scores far lower."""
    export_textured_mesh(sphere, tmp_path / "b.glb", faces=4000, texture=256, **FAST)
    mesh = load(tmp_path / "b.glb")
    image = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))
    mesh.visual.material.baseColorTexture = Image.fromarray(
        np.broadcast_to(image.reshape(-1, 3).mean(0).astype(np.uint8), image.shape).copy())
    assert mesh_vs_field(sphere, mesh, size=64, views=4)["psnr"] < 20.0


def test_lit_texture_is_shaded_by_the_light(sphere, tmp_path):
    from engine.cameras import spherical
    from engine.config import LiveParams

    live = LiveParams(light_azimuth=30.0, light_elevation=20.0, light_color=(1.0, 1.0, 1.0), ambient=0.1)
    stats = export_textured_mesh(sphere, tmp_path / "lit.glb", faces=4000, texture=256, lit=live, **FAST)
    assert [p.name for p in stats["files"]] == ["lit.glb", "lit_lit.png"]
    mesh = load(tmp_path / "lit.glb")
    albedo = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), float)
    lit = np.asarray(Image.open(tmp_path / "lit_lit.png").convert("RGB"), float)
    assert lit.shape == albedo.shape
    light = spherical(*(torch.tensor([v]) for v in (30.0, 20.0, 1.0))).numpy()[0]
    facing = mesh.vertex_normals @ (light / np.linalg.norm(light))
    toward, away = int(facing.argmax()), int(facing.argmin())
    ratio = []
    for v in (toward, away):
        u, w = mesh.visual.uv[v]
        x, y = min(int(u * 256), 255), min(int((1 - w) * 256), 255)
        ratio.append(lit[y, x].sum() / max(1.0, albedo[y, x].sum()))
    assert ratio[0] > 0.7  # lit head-on: albedo x (cos ~1 + 0.1 ambient), less the point light's slant
    assert ratio[1] == pytest.approx(0.1, abs=0.03)  # in shadow: ambient only


def test_clean_drops_floaters_and_keeps_the_largest_part():
    big = trimesh.creation.icosphere(subdivisions=3)  # 1280 faces
    small = trimesh.creation.box(extents=(0.1, 0.1, 0.1))  # 12 faces: under 1 % of the largest part
    small.apply_translation([3.0, 0, 0])
    twin = big.copy()
    twin.apply_translation([-3.0, 0, 0])
    scene = trimesh.util.concatenate([big, small, twin])
    v, f = clean(np.asarray(scene.vertices), np.asarray(scene.faces))
    assert len(f) == 2 * 1280 and len(v) == 2 * len(big.vertices)  # the floater is gone, both spheres stay
    v, f = clean(np.asarray(scene.vertices), np.asarray(scene.faces), largest_only=True)
    assert len(f) == 1280 and abs(v[:, 0].mean()) < 0.01  # of two equal parts, one: the first


def test_dilation_fills_every_empty_texel_from_its_nearest_baked_one():
    image = np.zeros((8, 8, 3), np.float32)
    filled = np.zeros((8, 8), bool)
    image[1, 1], filled[1, 1] = (1.0, 0.0, 0.0), True
    image[6, 6], filled[6, 6] = (0.0, 0.0, 1.0), True
    out = dilate(image, filled)
    assert (out[0, 0] == (1, 0, 0)).all() and (out[7, 7] == (0, 0, 1)).all() and (out[2, 3] == (1, 0, 0)).all()
    assert (out.sum(-1) == 1).all()  # no texel keeps the empty black
    with pytest.raises(ValueError, match="no texel"):
        dilate(image, np.zeros((8, 8), bool))


@pytest.mark.parametrize("faces, texture, message", [
    (50, 1024, "face budget"), (10**9, 1024, "face budget"), (2.5e4, 1024, "face budget"),
    (20_000, 32, "texture size"), (20_000, 8192, "texture size"), (20_000, True, "texture size")])
def test_bad_budgets_are_refused_before_any_work(sphere, tmp_path, faces, texture, message):
    with pytest.raises(ValueError, match=message):
        export_textured_mesh(sphere, tmp_path / "m.glb", faces=faces, texture=texture)
    with pytest.raises(ValueError, match=r"\.glb or \.obj"):
        export_textured_mesh(sphere, tmp_path / "m.ply")
    assert not list(tmp_path.iterdir())
    assert check_budget(100, 64) == (100, 64)


def test_cli_refuses_bad_values_with_one_line(tmp_path, capsys):
    from engine.__main__ import main

    for extra, message in ((["--mesh", "m.glb", "--texture", "10"], "texture size must be"),
                           (["--mesh", "m.glb", "--faces", "5"], "face budget must be"),
                           (["--mesh", "m.glb", "--decimate", "500"], "a textured mesh takes --faces"),
                           (["--mesh", "m.ply", "--faces", "500"], "a vertex-colour mesh takes --decimate")):
        assert main(["export", "--run", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, crashing", [("m.glb", "m.glb"), ("m.obj", "m.png"), ("m.obj", "m.obj")])
def test_a_failed_write_leaves_nothing(sphere, tmp_path, monkeypatch, name, crashing):
    """`crashing` is written half-way to its temp file, then the disk fills up: no file of the export remains,
    neither that temp file nor the ones written before it (the lit texture; an obj's png and mtl)."""
    from engine.config import LiveParams

    real_bytes, real_save = Path.write_bytes, Image.Image.save

    def crashes(path) -> bool:
        return Path(path).name.startswith(f".{crashing}.")  # atomic_write's temp name: .<name>.<random>.part<suffix>

    def write_bytes(self, data):
        real_bytes(self, data[: len(data) // 2])
        if crashes(self):
            raise OSError("disk full")
        return real_bytes(self, data)

    def save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        if isinstance(fp, str | Path) and crashes(fp):
            raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError, match="disk full"):
        export_textured_mesh(sphere, tmp_path / name, faces=500, texture=64, resolution=32, lit=LiveParams())
    assert not list(tmp_path.iterdir())


def test_trained_run_exports_through_the_cli(tmp_path):
    from engine.__main__ import main
    from engine.checkpoint import save_checkpoint
    from engine.config import LiveParams
    from engine.priors import load_prior
    from engine.testing import tiny_config
    from engine.trainer import Trainer

    live = LiveParams(prompt="a red sphere")
    trainer = Trainer(tiny_config(), load_prior("oracle:sphere"), live=live)
    for _ in range(30):
        trainer.step(live)
    save_checkpoint(trainer, tmp_path, live)
    assert main(["export", "--run", str(tmp_path), "--mesh", "m.glb", "--faces", "2000", "--texture", "128",
                 "--mesh-resolution", "48", "--largest-only"]) == 0
    mesh = load(tmp_path / "m.glb")
    check_textured(mesh, 128, 2000)
    colors = np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), float) / 255
    assert colors.std() < 0.5 and 0.0 < colors.mean() < 1.0
