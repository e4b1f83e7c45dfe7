"""Batch runs on Ray (engine/batch/): one local Ray with 2 CPUs for the module; a small oracle batch end to
end (manifest, gallery in headless Chromium), re-run skips, bad lines fail alone, refusals, a killed worker
whose run resumes from its checkpoint bit-identical to a run that never stopped; and `python -m engine batch`
as a subprocess whose Ray dies under it (its runtime-env agent or its raylet killed) or which gets SIGTERM:
it stops in time, its Ray processes go, and the same command resumes it."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import batch
from engine.__main__ import main

ray = pytest.importorskip("ray")

TINY = (("render.resolution", 16), ("render.num_samples", 24))
OUTPUTS = batch.RunOutputs(exports=("gif", "snapshot"), size=32, frames=4, eval_views=2, score_at=(10,))
LINES = ["a red cube", "a blue sphere | prior=oracle:sphere", "a green cone | live.guidance_scale=abc",
         "a red cube | prior=oracle:dodecahedron"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def tiny_runs(lines=LINES, seeds=(0, 1), steps=20):
    grid = [tuple(TINY)]
    return batch.expand(lines, list(seeds), grid, prior="oracle:cube", steps=steps)


@pytest.fixture(scope="module")
def done_batch(local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "b"
    runs = tiny_runs()
    t0 = time.monotonic()
    rows = batch.run_batch(runs, out, outputs=OUTPUTS, checkpoint_every=10, progress=False)
    return {"out": out, "runs": runs, "rows": rows, "wall": time.monotonic() - t0}


def test_batch_runs_every_line_and_writes_manifest(done_batch):
    out, rows = done_batch["out"], done_batch["rows"]
    status = [(r["prompt"], r["settings"], r["seed"], r["status"], r["message"]) for r in rows]
    assert len(rows) == 8 and [r["status"] for r in rows].count("done") == 4, status
    for r in rows:
        if r["status"] == "done":  # trained to the end, scored, exported, checkpoint on disk
            assert r["step"] == r["steps"] == 20 and r["its_per_s"] > 0 and r["attempts"] == 0
            assert 0 <= r["geometry_r_precision"] <= 1 and 0 <= r["colour_r_precision"] <= 1
            assert 0 <= r["scores"]["10"]["geometry_r_precision"] <= 1  # scored on the way too (score_at)
            folder = out / r["run_id"]
            assert {"checkpoint.safetensors", "checkpoint.json", "orbit.gif", "snapshot.png", "metrics.json",
                    "preview.png"} <= {p.name for p in folder.iterdir()}  # as the README says a run folder holds
            metrics = json.loads((folder / "metrics.json").read_text())
            assert metrics["step"] == 20 and "foreground_share" in metrics["evaluation"]
            assert r["files"]["gif"] == f"{r['run_id']}/orbit.gif"
        elif r["prompt"] == "a green cone":  # a bad value fails its run alone, before it starts
            assert r["status"] == "failed" and "guidance_scale must be a number" in r["message"]
        else:  # a prior that will not load fails in the worker; its message comes back
            assert r["status"] == "failed" and "unknown solid 'dodecahedron'" in r["message"], r
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == [r.run_id for r in done_batch["runs"]]
    with open(out / "manifest.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8 and set(batch.CSV_COLUMNS) == set(table[0])
    assert json.loads(table[0]["settings"]) == dict(TINY)
    assert not [p for p in out.rglob(".*")], "a temp file was left behind"


def test_gallery_sorts_cards_in_headless_chromium(done_batch, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto((done_batch["out"] / "index.html").as_uri())
            assert page.locator("h1").inner_text() == "b"  # the batch folder's name
            assert page.locator(".card").count() == 8
            assert sorted(page.locator("section.group h2").all_inner_texts()) == ["a blue sphere", "a green cone",
                                                                                   "a red cube"]
            assert page.locator(".card.failed").count() == 4
            page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator(".card img").count() == 8  # the done runs' GIFs and previews load offline
            sizes = page.evaluate("[...document.querySelectorAll('.card img')].map(i => [i.clientWidth, i.naturalWidth])")
            assert all(shown <= natural for shown, natural in sizes), f"a picture is stretched: {sizes}"
            flagged = [r for r in done_batch["rows"] if r.get("foreground_share", 1) < 0.002]
            assert page.locator(".card.flagged .flag").count() >= len(flagged)
            for key in ("shape_margin", "geometry_r_precision"):
                page.select_option("#sort", key)
                values = page.evaluate(f"""[...document.querySelectorAll('section.group')].map(g =>
                    [...g.querySelectorAll('.card')].map(c => parseFloat(c.dataset['{key}'] ?? '-1')))""")
                for group in values:
                    assert group == sorted(group, reverse=True), (key, values)
                best = [max(g) for g in values]
                assert best == sorted(best, reverse=True)
            shots = Path(os.environ.get("PLAYGROUND_SCREENSHOTS") or tmp_path)
            page.screenshot(path=str(shots / "gallery.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "gallery.png").stat().st_size > 0


def test_rerun_skips_done_runs(done_batch):
    out, runs = done_batch["out"], done_batch["runs"]
    done = [r for r in done_batch["rows"] if r["status"] == "done"]
    stamps = {r["run_id"]: (out / r["run_id"] / "checkpoint.safetensors").stat().st_mtime_ns for r in done}
    rows = batch.run_batch(runs, out, outputs=OUTPUTS, checkpoint_every=10, progress=False, workers=1)
    assert [r["status"] for r in rows] == [r["status"] for r in done_batch["rows"]]
    for r in done:  # not trained again
        assert (out / r["run_id"] / "checkpoint.safetensors").stat().st_mtime_ns == stamps[r["run_id"]]
        assert next(x for x in rows if x["run_id"] == r["run_id"])["wall_s"] == r["wall_s"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refusals_are_one_line_and_start_nothing(done_batch, local_ray, tmp_path, capsys, monkeypatch):
    def refused(*args) -> str:
        rc = main(["batch", "--prompt", "a blue cone", "--prior", "oracle:cone", "--quiet", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
        return err

    assert "holds another batch" in refused("--out", str(done_batch["out"]))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert "not a batch folder" in refused("--out", str(tmp_path / "notes"))
    fresh = tmp_path / "fresh"
    assert "no Ray cluster answers" in refused("--out", str(fresh), "--address", f"ray://127.0.0.1:{_free_port()}")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in refused("--out", str(fresh), "--gpus-per-run", "1")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert "Ray is not installed" in refused("--out", str(fresh))
    assert not fresh.exists()


def test_killed_worker_resumes_from_its_checkpoint_bit_identical(local_ray, tmp_path):
    from engine.priors import load_prior
    from engine.trainer import Trainer

    (spec,) = tiny_runs(["a red cube"], seeds=[3], steps=40)
    killed = []

    def kill_first_worker(event):
        if event["kind"] == "checkpoint" and not killed:
            killed.append(event["step"])
            os.kill(event["pid"], signal.SIGKILL)

    (row,) = batch.run_batch([spec], tmp_path / "b", outputs=batch.RunOutputs(eval_views=2), checkpoint_every=10,
                             progress=False, on_event=kill_first_worker)
    assert killed == [10] and row["status"] == "done" and row["attempts"] == 1 and row["resumed_from"] == [10]
    assert row["step"] == 40

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (one CPU per run)
    try:
        cfg, live = batch.run_config(spec)
        trainer = Trainer(cfg, load_prior(cfg.prior), "cpu", live)
        while trainer.step_count < live.steps:
            trainer.step(live)
    finally:
        torch.set_num_threads(threads)
    from engine.checkpoint import trainer_tensors

    want, got = trainer_tensors(trainer), load_file(tmp_path / "b" / spec.run_id / "checkpoint.safetensors")
    assert set(want) == set(got)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


def test_runs_expand_from_lines_seeds_and_grids():
    assert batch.parse_seeds("0-3") == [0, 1, 2, 3] and batch.parse_seeds("5,0-1,5") == [5, 0, 1]
    with pytest.raises(ValueError, match="--seeds"):
        batch.parse_seeds("a-b")
    grid = batch.parse_grid(["live.guidance_scale=10,20", "camera.elevation_range=[0,30],[0,60]"])
    assert len(grid) == 4 and grid[1] == (("live.guidance_scale", 10), ("camera.elevation_range", [0, 60]))
    runs = batch.expand(["a red cube | live.guidance_scale=5 prior=oracle:cube", "a cone | nonsense", "a mug"],
                        [0, 1], grid, prior="embedded", steps=50)
    assert len(runs) == 2 * 2 + 2 * 4 * 2 and len({r.run_id for r in runs}) == len(runs)  # the line's 5 wins
    first = runs[0]
    assert first.prior == "oracle:cube" and dict(first.settings)["live.guidance_scale"] == 5 and first.steps == 50
    assert runs[4].error and "KEY=VALUE" in runs[4].error  # a bad line: its runs fail without starting
    cfg, live = batch.run_config(runs[-1])
    assert cfg.camera.elevation_range == (0, 60) and live.guidance_scale == 20 and live.steps == 50 and cfg.seed == 1
    with pytest.raises(ValueError, match="unknown setting"):
        batch.run_config(batch.RunSpec("a mug", settings=(("sds.nothing", 1),)))


def test_a_score_on_the_way_is_the_score_of_the_shorter_run():
    """RunOutputs.score_at: a run scored at step 3 on its way to 6 has, at 3, exactly the scores of a 3-step run
    (nothing in training reads the step budget, and scoring draws from its own generator); scoring time is not
    training time, and the run still ends bit-identical to an unscored one."""
    worker = batch.Worker()
    spec = lambda steps: batch.RunSpec("a red cube", 0, "oracle:cube", steps, TINY)  # noqa: E731
    plain = batch.RunOutputs(eval_views=2)
    short = worker.advance(spec(3), None, 10, plain)
    scored = worker.advance(spec(6), None, 10, batch.RunOutputs(eval_views=2, score_at=(3, 99)))
    unscored = worker.advance(spec(6), None, 10, plain)
    assert short["done"] and scored["done"] and scored["scores"] == {"3": short["evaluation"]}
    assert 0 <= scored["scores"]["3"]["geometry_r_precision"] <= 1 and unscored["scores"] == {}
    assert scored["weights"] == unscored["weights"] and scored["evaluation"] == unscored["evaluation"]


# -- `python -m engine batch` when Ray dies under it, or SIGTERM comes ---------------------------------------
ROOT = Path(__file__).resolve().parents[1]
SHORT_LONG = ["a red cube | steps=20", "a blue sphere | prior=oracle:sphere steps=80"]  # one ends, one is cut


def cli_args(out: Path, prompts: Path) -> list[str]:
    prompts.write_text("\n".join(SHORT_LONG) + "\n")
    return ["batch", str(prompts), "--prior", "oracle:cube", "--grid", "render.resolution=16", "--grid",
            "render.num_samples=24", "--checkpoint-every", "10", "--workers", "2", "--quiet", "--out", str(out)]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def gone(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # an orphan this container's init does not reap
    except psutil.Error:
        return True


def batch_processes(proc: subprocess.Popen, want: str, timeout: float = 300) -> list:
    """The processes under a running `engine batch` (its driver and the local Ray it started), once the short
    run is done, the long one has a checkpoint and a process whose cmdline starts with `want` is there."""
    import psutil

    out = Path(proc.args[proc.args.index("--out") + 1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        tree = psutil.Process(proc.pid).children(recursive=True)
        rows = json.loads((out / "manifest.json").read_text())["runs"] if (out / "manifest.json").exists() else []
        if [r["status"] for r in rows] == ["done", "running"] and list(out.glob("a-blue-sphere*/checkpoint.json")) \
                and any((p.cmdline() or [""])[0].endswith(want) for p in tree if not gone(p)):
            return tree
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of the long run, or no {want}, within {timeout} s")


def stopped_in_time(proc: subprocess.Popen, tree: list, bound: float) -> tuple[int, str]:
    import psutil

    t0 = time.monotonic()
    _, err = proc.communicate(timeout=bound)
    psutil.wait_procs(tree, timeout=max(0.1, bound - (time.monotonic() - t0)))
    assert time.monotonic() - t0 < bound and all(gone(p) for p in tree), (err, [p for p in tree if not gone(p)])
    print(f"stopped, its processes gone, {time.monotonic() - t0:.1f} s after")
    return proc.returncode, err.strip().splitlines()[-1]


def assert_kept(out: Path) -> tuple[dict, dict]:
    """The manifest kept the finished run, and the cut one as pending from its checkpoint."""
    short, long_ = json.loads((out / "manifest.json").read_text())["runs"]
    assert short["status"] == "done" and long_["status"] == "pending" and long_["step"] >= 10, (short, long_)
    assert list(out.glob("a-blue-sphere*/checkpoint.json")), "the cut run's checkpoint"
    return short, long_


def assert_resumes(args: list[str], out: Path) -> None:
    """What was kept, and the same command finishes the cut run from its checkpoint."""
    short, _ = assert_kept(out)
    proc = start(args)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and json.loads(stdout)["done"] == 2, err
    again_short, again_long = json.loads((out / "manifest.json").read_text())["runs"]
    assert again_short == short  # not run again
    assert again_long["status"] == "done" and again_long["step"] == 80 and again_long["resumed_from"][0] >= 10


@pytest.mark.parametrize("victim, words", [("ray::RuntimeEnvAgent", "Ray's runtime-env agent (pid"),
                                           ("raylet", "the local Ray node's raylet (pid")])
def test_a_dead_ray_node_stops_the_batch_which_the_same_command_resumes(tmp_path, victim, words):
    out, args = tmp_path / "b", cli_args(tmp_path / "b", tmp_path / "prompts.txt")
    proc = start(args)
    tree = batch_processes(proc, victim)
    (target,) = [p for p in tree if (p.cmdline() or [""])[0].endswith(victim)]
    target.kill()
    rc, last = stopped_in_time(proc, tree, 60)  # the bound
    assert rc == 3 and last.startswith(f"stopped: {words}") and "1 of 2 runs done" in last, last
    assert last.endswith(f"resume with: python -m engine {shlex.join(args)}"), last
    if victim != "raylet":  # (the same resume after a killed raylet: once is enough for the suite's time)
        assert_resumes(args, out)


def test_sigterm_stops_the_batch_and_its_ray_within_10_s(tmp_path):
    out, args = tmp_path / "b", cli_args(tmp_path / "b", tmp_path / "prompts.txt")
    proc = start(args)
    tree = batch_processes(proc, "raylet")
    proc.send_signal(signal.SIGTERM)
    rc, last = stopped_in_time(proc, tree, 10)  # the bound
    assert rc == 143 and last.startswith("terminated: 1 of 2 runs done, checkpoints kept in"), last
    assert not list(out.rglob(".*.part*")), "a half-written file"
    assert_kept(out)  # (that the same command resumes from there: the dead-agent test shows it)
