"""The SDS protocol over settings and seeds (issue 3): ten prompts, default settings, scored by the toy R-Precision.

`bench/bench_sds_prompts.py` is its command line (its docstring has the commands). Each prompt trains a fresh
field from the embedded prior's defaults for at most --steps steps and --seconds of wall time, then
`engine.evaluate` scores 16 random views: colour R-Precision on shaded renders, geometry R-Precision on
textureless renders, the silhouette score and the translucent share. Prompts run through the batch runner
(`engine.batch`, on Ray) in --jobs workers of one torch thread each; each run's checkpoint, preview and scores
stay in the batch folder (--batch, default runs/batch-<time>; the same folder again skips the runs done).

--grid KEY=V1,V2 and --seeds 0,1 repeat the protocol for each setting and seed, seed by seed, and print one
summary row per setting (over prompts and seeds). --json FILE keeps every run's scores; the same FILE again
skips the runs it holds, so a long protocol goes on where it stopped, even from another machine; rows of
settings that this invocation does not ask for stay in it.

--eval-at 250,500,1000,2000 scores each run at these steps of its one training (the scores of a run of that many
steps: nothing in training reads the budget) and keeps the training seconds to each: time spent in training
steps only, not the evaluations, checkpoints, start-up or the prior's loading. A run's last step is scored by
its final evaluation. The table after the summary gives setting x step: runs that got there, mean colour and
geometry R-Precision, the share of runs meeting both TARGETS, mean training seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from engine.batch import parse_grid, parse_seeds
from engine.checkpoint import atomic_write
from lab.protocol import PROMPTS, add_run_args, job_of, run_protocol, scored_row, spec_of, summarize

TARGETS = {"colour_r_precision": 0.9, "geometry_r_precision": 0.8}  # the protocol's targets (issue 3): a run meets both


def label_of(combo: tuple) -> str:
    """A grid combination's name in tables: "live.distillation=csd" (several joined by ", "), or "defaults"."""
    return ", ".join(f"{k}={v}" for k, v in combo) or "defaults"


def _row_summary(rows: list[dict]) -> dict:
    """Means over a setting's finished runs and the share of them meeting both TARGETS; under "at", the same of
    the scores at each step of --eval-at, "wall_s" there the mean training seconds to that step."""
    done = [r for r in rows if r.get("status") == "done"]
    share = [r["translucent_share"] for r in done if "translucent_share" in r]
    met = [all(r.get(k, 0) >= v for k, v in TARGETS.items()) for r in done]
    out = {**summarize(done), "runs": len(done), "seeds": sorted({r["seed"] for r in done}),
           "translucent_share": round(sum(share) / len(share), 3) if share else None,
           "targets_met": round(sum(met) / len(met), 3) if met else None}
    steps = sorted({int(k) for r in done for k in r.get("scores", {})})
    if steps:  # each step's row holds only what was taken there (its seconds too), and the run's seed
        out["at"] = {str(k): _row_summary([{"status": "done", "seed": r["seed"], **r["scores"][str(k)]} for r in done
                                           if str(k) in r.get("scores", {})]) for k in steps}
    return out


def _resumable(todo: list[dict], every: list[dict], folder: Path) -> tuple[list[dict], Path]:
    """The jobs to hand the batch runner and its folder. A folder left by an interrupted invocation holds either
    all of this seed's runs or the ones it had to do: given the same set again, the batch runner skips what
    it finished and resumes what it had begun from its checkpoints. Any other set gets a folder of its own."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return todo, folder
    held = {r["run_id"] for r in json.loads(manifest.read_text())["runs"]}
    for jobs in (every, todo):
        if held == {spec_of(j).run_id for j in jobs}:
            return jobs, folder
    key = hashlib.sha1(" ".join(sorted(spec_of(j).run_id for j in todo)).encode()).hexdigest()[:6]
    return todo, folder.with_name(f"{folder.name}-{key}")


def summary_table(groups: dict) -> str:
    """One markdown row per setting: runs, then colour / geometry R-Precision (± s.e.) and translucent share at
    each scoring step (--score-at, then the end), and it/s."""
    def cells(g):
        if not g or g["runs"] == 0:
            return ["–"] * 3
        se = f" ± {g['geometry_se']:.3f}" if g["geometry_se"] is not None else ""
        return [f"{g['colour_r_precision']:.2f}", f"{g['geometry_r_precision']:.3f}{se}", f"{g['translucent_share']:.2f}"]

    steps = sorted({int(k) for g in groups.values() for k in g.get("at", {})})
    head = [f"{k} at {s}" for s in steps for k in ("colour", "geometry", "translucent")]
    lines = ["| setting | runs | " + " | ".join(head + ["colour", "geometry", "translucent", "it/s"]) + " |",
             "|---" * (len(head) + 6) + "|"]
    for name, g in groups.items():
        at = [c for s in steps for c in cells(g.get("at", {}).get(str(s)))]
        lines.append(f"| {name} | {g['runs']} | " + " | ".join(at + cells(g) + [f"{g['its_per_s'] or 0:.1f}"]) + " |")
    return "\n".join(lines)


def steps_table(groups: dict) -> str:
    """One markdown row per setting and --eval-at step: runs that reached it, mean colour and geometry R-Precision,
    the share of runs meeting both TARGETS, and the mean training seconds to that step."""
    lines = ["| setting | step | runs | colour R-P | geometry R-P | targets met | training s |", "|---" * 7 + "|"]
    for name, g in groups.items():
        for step, at in g.get("at", {}).items():
            secs = f"{at['wall_s']:.1f}" if at["wall_s"] is not None else "–"
            lines.append(f"| {name} | {step} | {at['runs']} | {at['colour_r_precision']:.2f} | "
                         f"{at['geometry_r_precision']:.3f} | {at['targets_met']:.2f} | {secs} |")
    return "\n".join(lines)


def main(argv=None, description: str = __doc__.split("\n")[0], parser: argparse.ArgumentParser | None = None) -> dict:
    """Run (or with --report, only tabulate) the protocol; {"summary": first setting's means, "groups": per setting,
    "rows": every run's scores, "args": the parsed arguments}. `parser`: one with the caller's own options added."""
    ap = parser or argparse.ArgumentParser(description=description)
    add_run_args(ap, PROMPTS, steps=2000, seconds=300.0)
    ap.add_argument("--seeds", default=None, help="several seeds, e.g. 0,1 or 0-3 (instead of --seed)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="repeat the protocol for each value, e.g. live.distillation=sds,csd; several grids multiply")
    ap.add_argument("--eval-at", "--score-at", dest="eval_at", default="", metavar="STEPS",
                    help="also score each run at these steps on its way, e.g. 250,500,1000,2000, with the training "
                         "seconds to each (a run's first N steps are a N-step run; one table: setting x step)")
    ap.add_argument("--out", default="runs/protocol", help="folder for previews (shaded row, textureless row)")
    ap.add_argument("--json", default=None, help="also write every run's scores here; runs it holds are skipped")
    ap.add_argument("--report", action="store_true", help="run nothing: print the tables of the runs --json holds")
    ap.add_argument("--save-runs", action="store_true", help="also save each run's checkpoint in OUT/<prompt>/")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds, grid = parse_seeds(args.seeds) if args.seeds else [args.seed], parse_grid(args.grid)
    eval_at = tuple(parse_seeds(args.eval_at)) if args.eval_at else ()
    if eval_at and max(eval_at) > args.steps:
        ap.error(f"--eval-at {args.eval_at}: a step past --steps {args.steps}")
    jobs = []  # seed by seed, so that a protocol stopped early has every setting at its first seeds
    for seed in seeds:
        for combo in grid:
            tag = "".join(f"_{v}" for _, v in combo) + (f"_s{seed}" if len(seeds) > 1 else "")
            for p in args.prompts:
                name = p.replace(" ", "_") + tag
                jobs.append(job_of(args, p, seed=seed, set=args.set + [f"{k}={json.dumps(v)}" for k, v in combo],
                                   row=None, group=label_of(combo), preview=str(out / f"{name}.png"),
                                   save=str(out / name) if args.save_runs else None))
    kept = {}
    if args.json and Path(args.json).exists():
        kept = {r["run_id"]: r for r in json.loads(Path(args.json).read_text()).get("rows", [])
                if r.get("status") == "done"}
    others = [r for i, r in kept.items() if i not in {spec_of(j).run_id for j in jobs}]  # other settings': kept too
    todo = [] if args.report else [j for j in jobs if spec_of(j).run_id not in kept]
    if len(todo) < len(jobs) and not args.report:
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {args.json}; running the other {len(todo)}")
    t0 = time.perf_counter()
    ran = {}  # run id -> scores of the runs done by this invocation

    def keep(row: dict) -> None:
        ran[row["run_id"]] = {**{k: v for k, v in row.items() if k not in ("files", "node")}, "steps": row["step"]}

    def save() -> None:
        if args.json:
            rows = [{**(kept.get(spec_of(j).run_id) or ran[spec_of(j).run_id]), "group": j["group"]}
                    for j in jobs if spec_of(j).run_id in kept or spec_of(j).run_id in ran]
            groups = {label_of(c): _row_summary([r for r in rows if r["group"] == label_of(c)]) for c in grid}
            doc = {"groups": groups, "rows": rows + others}
            atomic_write(args.json, lambda p: Path(p).write_text(json.dumps(doc, indent=1)))

    for seed in seeds:  # one batch per seed
        batch = [j for j in todo if j["seed"] == seed]
        if not batch:
            continue
        folder = Path(args.batch or f"runs/batch-{time.strftime('%Y%m%d-%H%M%S')}")
        folder = folder.with_name(f"{folder.name}-s{seed}") if len(seeds) > 1 else folder
        batch, folder = _resumable(batch, [j for j in jobs if j["seed"] == seed], folder)

        def on_event(event, folder=folder):  # each finished run reaches --json at once
            if event["kind"] == "done" and (folder / "manifest.json").exists():
                for r in json.loads((folder / "manifest.json").read_text())["runs"]:
                    if r["status"] == "done":
                        keep(scored_row(r, folder, eval_at))
                save()

        try:
            done = run_protocol(batch, folder, workers=args.jobs, on_event=on_event, score_at=eval_at)
        except KeyboardInterrupt:
            on_event({"kind": "done"})  # the runs the folder's manifest says are done
            sys.exit(f"interrupted: the finished runs are in {args.json or folder}; the same command again goes on")
        for r in done:
            if r["status"] == "done":
                keep({**r, "step": r["steps"]})
        save()
    rows = [{**(kept.get(spec_of(j).run_id) or ran.get(spec_of(j).run_id) or {}), "group": j["group"]} for j in jobs]
    print("\n| setting | prompt | seed | colour R-P | geometry R-P | translucent | steps | wall s | it/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("status") == "done":
            print(f"| {r['group']} | {r['prompt']} | {r['seed']} | {r.get('colour_r_precision', 0):.2f} | "
                  f"{r.get('geometry_r_precision', 0):.2f} | {r.get('translucent_share', 0):.2f} | {r['steps']} | "
                  f"{r['wall_s']} | {r['its_per_s']} |")
    groups = {label_of(c): _row_summary([r for r in rows if r["group"] == label_of(c)]) for c in grid}
    for name, g in groups.items():
        print(json.dumps({"setting": name, **{k: v for k, v in g.items() if k != "at"}}))
        for step, at in g.get("at", {}).items():
            print(json.dumps({"setting": name, "at_step": int(step), **at}))
    print(summary_table(groups))
    if any("at" in g for g in groups.values()):
        print("\n" + steps_table(groups))
    summary = {**groups[label_of(grid[0])], "total_wall_s": round(time.perf_counter() - t0, 1),
               "steps_budget": args.steps, "seconds_budget": args.seconds, "jobs": args.jobs}
    return {"summary": summary, "groups": groups, "rows": rows, "args": args}
