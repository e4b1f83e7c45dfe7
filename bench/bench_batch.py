"""Batch runs on Ray (issue 28): runs per minute with 1 and 2 workers, Ray's overhead per run against
`python -m engine run`, and a fault run (a worker killed mid-run, its run resumed from its checkpoint).

1. throughput: the same batch (--runs runs of --steps steps: prompts x seeds, embedded prior) with 1 worker, then 2;
   each batch's wall time counts its workers' start, not Ray's (started once, timed apart);
2. overhead: --overhead-runs runs of --overhead-steps steps, each as its own `python -m engine run`, then all
   as one `python -m engine batch --workers 1` (so Ray's start counts once), one torch thread in both; the
   batch's evaluation (which `engine run` does not do) is taken out of its time and shown apart;
3. fault: one --fault-steps run whose worker is killed (SIGKILL) halfway between two checkpoints past the middle;
   the batch must finish it from its last checkpoint; how many steps were trained twice.

    python bench/bench_batch.py                                           # the figures (quiet machine, ~12 min)
    python bench/bench_batch.py --prior oracle:cube --runs 4 --steps 20 --overhead-steps 40 --fault-steps 120 \\
        --checkpoint-every 20 --resolution 16                               # a smoke test (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.batch import RunOutputs, RunSpec, run_batch  # noqa: E402

PROMPTS = ("a red cube", "a blue sphere", "a green cone", "a yellow cylinder")
NO_EXPORTS = RunOutputs()


def specs(args, n: int, steps: int, seed0: int = 0) -> list[RunSpec]:
    """n runs: the prompts in turn, each with the next seed."""
    settings = (("render.resolution", args.resolution),) if args.resolution else ()
    return [RunSpec(PROMPTS[i % len(PROMPTS)], seed0 + i // len(PROMPTS), args.prior, steps, settings)
            for i in range(n)]


def throughput(args, tmp: Path) -> dict:
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    out = {"ray_start_s": round(time.perf_counter() - t0, 2)}
    try:
        for workers in (1, 2):
            t0 = time.perf_counter()
            rows = run_batch(specs(args, args.runs, args.steps), tmp / f"w{workers}", outputs=NO_EXPORTS,
                             workers=workers, checkpoint_every=args.checkpoint_every, progress=False)
            wall = time.perf_counter() - t0
            assert all(r["status"] == "done" for r in rows), [r["message"] for r in rows]
            out[f"{workers}_workers"] = {"wall_s": round(wall, 1), "runs_per_min": round(60 * len(rows) / wall, 2),
                                         "its_per_s": round(sum(r["step"] for r in rows) / sum(r["wall_s"] for r in rows)
                                                            * workers, 1)}
    finally:
        ray.shutdown()
    out["speedup"] = round(out["2_workers"]["runs_per_min"] / out["1_workers"]["runs_per_min"], 2)
    return out


def _timed(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0, proc.stdout


def overhead(args, tmp: Path) -> dict:
    """--overhead-runs runs of --overhead-steps steps: each as its own `python -m engine run`, then all as one
    `python -m engine batch --workers 1` (Ray started once, the prior loaded once per worker)."""
    runs = specs(args, args.overhead_runs, args.overhead_steps)
    res = ["--resolution", str(args.resolution)] if args.resolution else []
    grid = ["--grid", f"render.resolution={args.resolution}"] if args.resolution else []
    run_s = sum(_timed([sys.executable, "-m", "engine", "run", "--prompt", r.prompt, "--prior", r.prior, "--steps",
                        str(r.steps), "--seed", str(r.seed), *res, "--quiet", "--out", str(tmp / f"run{i}")])[0]
                for i, r in enumerate(runs))
    prompts = [a for r in runs for a in ("--prompt", r.prompt)]  # seed 0 each: the first len(PROMPTS) runs
    assert all(r.seed == 0 for r in runs), "--overhead-runs: at most one run per prompt"
    batch_s, _ = _timed([sys.executable, "-m", "engine", "batch", *prompts, "--prior", args.prior, "--steps",
                         str(args.overhead_steps), *grid, "--seeds", "0", "--workers", "1", "--quiet",
                         "--checkpoint-every", str(args.checkpoint_every), "--out", str(tmp / "batch")])
    rows = json.loads((tmp / "batch" / "manifest.json").read_text())["runs"]
    eval_s = sum(r["eval_s"] for r in rows)
    return {"runs": len(runs), "steps": args.overhead_steps, "engine_run_s": round(run_s, 1),
            "engine_batch_s": round(batch_s, 1), "batch_eval_s": round(eval_s, 1),
            "overhead_pct": round(100 * (batch_s - eval_s - run_s) / run_s, 1)}


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # the run ended first
        pass


def fault(args, tmp: Path) -> dict:
    (spec,) = specs(args, 1, args.fault_steps, seed0=7)
    every, state = args.checkpoint_every, {}

    def kill_midway(event):  # past the middle: kill the worker half a segment after its checkpoint
        if event["kind"] == "checkpoint" and event["step"] >= spec.steps // 2 and not state:
            state["checkpoint"], state["t"] = event["step"], time.perf_counter()
            delay = 0.5 * every / max(event.get("its_per_s") or 1.0, 1e-3)
            state["timer"] = threading.Timer(delay, _kill, (event["pid"],))
            state["timer"].start()

    t0 = time.perf_counter()
    (row,) = run_batch([spec], tmp / "fault", outputs=NO_EXPORTS, workers=1, checkpoint_every=every,
                       progress=False, on_event=kill_midway)
    return {"steps": spec.steps, "checkpoint_every": every, "status": row["status"], "final_step": row["step"],
            "attempts": row["attempts"], "resumed_from": row["resumed_from"],
            "steps_redone_estimate": row["steps_redone"], "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prior", default="embedded")
    ap.add_argument("--runs", type=int, default=8, help="runs of the throughput batch")
    ap.add_argument("--steps", type=int, default=500, help="steps of each throughput run")
    ap.add_argument("--overhead-steps", type=int, default=2000)
    ap.add_argument("--overhead-runs", type=int, default=2, help="runs compared (one prompt each, at most 4)")
    ap.add_argument("--fault-steps", type=int, default=2000)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--resolution", type=int, default=None, help="training render size (default: the preset's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"throughput": throughput(args, Path(tmp)), "overhead": overhead(args, Path(tmp)),
                   "fault": fault(args, Path(tmp))}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    results["command"] = "python bench/bench_batch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t, o, f = results["throughput"], results["overhead"], results["fault"]
    print("| workers | wall s | runs/min | it/s (all workers) |\n|---|---|---|---|")
    for w in (1, 2):
        r = t[f"{w}_workers"]
        print(f"| {w} | {r['wall_s']} | {r['runs_per_min']} | {r['its_per_s']} |")
    print(f"\n2 workers: {t['speedup']}x the runs per minute of 1 (Ray's start, {t['ray_start_s']} s, apart)")
    print(f"{o['runs']} runs of {o['steps']} steps: {o['runs']} x engine run {o['engine_run_s']} s, one engine batch "
          f"{o['engine_batch_s']} s (of which evaluation {o['batch_eval_s']} s): overhead {o['overhead_pct']} %")
    print(f"fault: {f['status']} at step {f['final_step']}/{f['steps']}, resumed from {f['resumed_from']}, "
          f"~{f['steps_redone_estimate']} steps trained twice, {f['wall_s']} s")
    print(json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
