"""Exports written and read back: PNG, mp4, GIF, glb/obj/ply; mesh volume; names; atomic writes.

Most tests render analytic solids (engine.priors.analytic.AnalyticField) whose shape and albedo are
known exactly, at small sizes, so the file runs in well under a minute on a contended CPU.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from engine.config import BackgroundConfig, Config, LiveParams
from engine.export import (
    MODES,
    RenderSource,
    export_mesh,
    run_folder,
    safe_path,
    slugify,
    snapshot,
    write_orbit_video,
)
from engine.field import Background
from engine.priors.analytic import AnalyticField

RED = (0.85, 0.12, 0.10)
SPHERE_RADIUS = 0.55  # engine.world.sdf_sphere's


def analytic_source(solid: str) -> RenderSource:
    cfg = Config(background=BackgroundConfig(kind="solid", color=(1.0, 1.0, 1.0))).with_settings(
        {"render.occupancy": False, "render.num_samples": 32})
    return RenderSource(AnalyticField(solid, RED), Background(cfg.background), None, cfg, step=7)


@pytest.fixture(scope="module")
def sphere():
    return analytic_source("sphere")


@pytest.fixture(scope="module")
def cube():  # not rotationally symmetric, so an orbit's frames differ (GIF writers merge equal frames)
    return analytic_source("cube")


@pytest.fixture(scope="module")
def sphere_mesh(sphere, tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "sphere.glb"
    export_mesh(sphere, path, resolution=64)
    return path


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".part" in p.name]


def test_render_modes_shapes_and_values(sphere):
    from engine.export import default_camera

    cams = default_camera()
    images = {m: sphere.image(cams, 24, 24, m) for m in MODES}
    for m, img in images.items():
        assert img.shape == (1, 3, 24, 24), m
        assert float(img.min()) >= 0 and float(img.max()) <= 1, m
    centre = (slice(None), slice(None), slice(10, 14), slice(10, 14))
    assert torch.allclose(images["albedo"][centre].mean((0, 2, 3)), torch.tensor(RED), atol=0.02)
    assert float(images["opacity"][centre].min()) > 0.99 and float(images["opacity"][..., 0, 0].max()) < 0.01
    for grey in ("depth", "opacity"):  # grey images: three equal channels
        assert torch.equal(images[grey][:, 0], images[grey][:, 1])
    with pytest.raises(ValueError, match="unknown render mode"):
        sphere.image(cams, 8, 8, "xray")


def test_from_trainer_is_a_detached_copy():
    from engine.priors import load_prior
    from engine.trainer import Trainer

    trainer = Trainer(Config(prior="oracle:sphere"), load_prior("oracle:sphere"))
    source = RenderSource.from_trainer(trainer)
    before = [p.clone() for p in source.field.parameters()]
    with torch.no_grad():
        for p in trainer.field.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, source.field.parameters(), strict=True))
    assert not any(p.requires_grad for p in source.field.parameters())
    assert source.step == trainer.step_count
    assert source.render(trainer_cams(), 8, 8).rgb.shape == (1, 3, 8, 8)


def trainer_cams():
    from engine.cameras import orbit

    return orbit(1)


def test_snapshot_png_size_and_mode(sphere, tmp_path):
    from engine.cameras import camera_from_c2w, orbit

    cam = camera_from_c2w(orbit(1, elevation=30.0).c2w[0], focal=1.0)  # the viewer's camera, as the pane sends it
    paths = snapshot(sphere, LiveParams(), tmp_path, camera=cam, mode="normal", size=40)
    assert paths["png"] == tmp_path / "snapshot-7-normal.png"
    with Image.open(paths["png"]) as im:
        assert im.size == (40, 40) and im.mode == "RGB"
    assert no_temp_files(tmp_path)


def test_mp4_frame_count_and_size(cube, tmp_path):
    path = write_orbit_video(cube, tmp_path / "orbit.mp4", frames=6, size=32, fps=10)
    reader = imageio.get_reader(path)
    assert reader.count_frames() == 6
    assert reader.get_data(0).shape == (32, 32, 3)
    reader.close()


def test_side_by_side_mp4(cube, tmp_path):
    path = write_orbit_video(cube, tmp_path / "sbs.mp4", frames=3, size=32, side_by_side=True)
    with imageio.get_reader(path) as reader:
        assert reader.get_data(0).shape == (32, 96, 3)


def test_gif_frames_and_mode(cube, tmp_path):
    path = write_orbit_video(cube, tmp_path / "orbit.gif", frames=5, size=32, mode="depth")
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (32, 32) and im.mode == "P"


def test_video_bad_suffix_and_values(cube, tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        write_orbit_video(cube, tmp_path / "orbit.avi", frames=2, size=16)
    with pytest.raises(ValueError, match="frames"):
        write_orbit_video(cube, tmp_path / "orbit.mp4", frames=0, size=16)
    assert not list(tmp_path.iterdir())


def test_failure_mid_write_leaves_no_file(cube, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = RenderSource.render

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first batch of frames has been written by then
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RenderSource, "render", flaky)
    for name in ("crash.mp4", "crash.gif"):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="simulated"):
            write_orbit_video(cube, tmp_path / name, frames=8, size=16)
    assert not list(tmp_path.iterdir())


def test_mesh_failure_mid_write_leaves_no_file(sphere, tmp_path, monkeypatch):
    def half_then_crash(self, file_obj, file_type=None, **kw):
        Path(file_obj).write_bytes(b"glTF partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(trimesh.Trimesh, "export", half_then_crash)
    with pytest.raises(OSError, match="simulated"):
        export_mesh(sphere, tmp_path / "m.glb", resolution=24, threshold=50.0)
    assert not list(tmp_path.iterdir())


def check_mesh(mesh: trimesh.Trimesh):
    assert len(mesh.faces) > 100
    assert np.linalg.norm(mesh.vertices, axis=1).max() <= 1.0  # inside the bounding sphere
    colors = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(float) / 255
    assert np.abs(colors - np.array(RED)).max() < 2 / 255


def test_glb_reads_back(sphere_mesh):
    check_mesh(trimesh.load(sphere_mesh, force="mesh"))


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_obj_ply_read_back(sphere, tmp_path, suffix):
    path = export_mesh(sphere, tmp_path / f"m{suffix}", resolution=32, threshold=50.0)
    check_mesh(trimesh.load(path, force="mesh", process=False))
    assert no_temp_files(tmp_path)


def test_mesh_volume_matches_sphere(sphere_mesh):
    mesh = trimesh.load(sphere_mesh, force="mesh")
    analytic = 4 / 3 * math.pi * SPHERE_RADIUS**3
    assert mesh.is_watertight
    assert abs(mesh.volume - analytic) / analytic < 0.10


def test_mesh_decimation_caps_faces(sphere, tmp_path):
    path = export_mesh(sphere, tmp_path / "small.ply", resolution=32, threshold=50.0, decimate=300)
    mesh = trimesh.load(path, process=False)
    assert 50 < len(mesh.faces) <= 300
    check_mesh_colors = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(float) / 255
    assert np.abs(check_mesh_colors - np.array(RED)).max() < 2 / 255


def test_empty_field_gives_a_message_not_a_file(sphere, tmp_path):
    with pytest.raises(ValueError, match="nothing above the density threshold"):
        export_mesh(sphere, tmp_path / "empty.glb", resolution=16, threshold=1e6)
    empty = analytic_source("sphere")
    empty.field.sigma_max = 0.0
    with pytest.raises(ValueError, match="nothing above the density threshold"):
        export_mesh(empty, tmp_path / "empty.obj", resolution=16)
    with pytest.raises(ValueError, match=r"\.glb, \.obj or \.ply"):
        export_mesh(sphere, tmp_path / "m.stl", resolution=16)
    assert not list(tmp_path.iterdir())


def test_slug_and_run_folder(tmp_path):
    assert slugify("../../x") == "x"
    assert slugify("A Red Cube, side view!") == "a-red-cube-side-view"
    assert slugify("/etc/passwd\x00") == "etc-passwd"
    assert slugify("日本語") == "untitled" and slugify("") == "untitled"
    now = datetime(2026, 11, 22, 9, 30, 5)
    folder = run_folder(tmp_path, "../../x", now=now)
    assert folder == tmp_path / "20261122-093005-x"
    assert folder.resolve().parent == tmp_path.resolve()
    folder.mkdir()
    assert run_folder(tmp_path, "../../x", now=now) == tmp_path / "20261122-093005-x-2"


def test_safe_path(tmp_path):
    assert safe_path(tmp_path, "a/b.png") == tmp_path.resolve() / "a/b.png"
    for bad in ("../x.png", "/etc/passwd", "a/../../x", "C:\\x.png", "..", "", "a\x00b"):
        with pytest.raises(ValueError):
            safe_path(tmp_path, bad)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        safe_path(tmp_path, "link/x.png")
