"""The paper's Fig. 6 ablation on the procedural world with the embedded prior (issue 3).

Rows, each adding to the one before: (i) base (albedo only, the plain prompt, eye-level cameras at a fixed
distance and focal), (ii) + view augmentation (the paper's camera distribution), (iii) + view-dependent
prompts, (iv) + lighting (lambertian with a random point light), (v) + textureless shading (the full
method). Every row trains the same prompts under the same budget; the table gives the mean toy
R-Precision (colour on shaded renders, geometry on textureless ones) and silhouette score.
`--write` puts the table into BENCHMARKS.md between the ablation markers.

Every run has the SDS protocol's budget (<= 2000 steps / 300 s, as `bench/bench_sds_prompts.py`), so the last
row is the protocol's own setting.

    python -m lab.ablation --write          # 3 prompts x 5 rows, <= 2000 steps / 300 s each, ~25 min
    python -m lab.ablation --seeds 2 --prompts ... --write   # more runs per row: smaller s.e.
    python -m lab.ablation --from-json runs/ablation.json   # the table again from saved runs (--out)
    python -m lab.ablation --rows base --out runs/row1.json ...   # one row per invocation, then
    python -m lab.ablation --from-json runs/row*.json --note "..."   # one table from all of them
    python -m lab.ablation --from-json runs/row*.json --power   # how many runs each step's sign needs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

from lab.protocol import ABLATION, add_run_args, job_of, paired_steps, pairs_to_resolve, run_protocol, summarize

PROMPTS = ("a red cube", "a green cone", "an orange mug")
ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"


def _step(st: dict | None) -> str:
    if st is None:
        return ""
    return f"{st['mean']:+.2f}" + (f" ± {st['se']:.2f}" if st["se"] is not None else "")


def table(results: dict[str, dict], steps: dict[str, dict] | None = None,
          shape_steps: dict[str, dict] | None = None) -> str:
    """The Markdown table: per row, the means, and the paired change of geometry and of the silhouette score
    from the row before (`lab.protocol.paired_steps`)."""
    steps, shape_steps = steps or {}, shape_steps or {}
    lines = ["| row | colour R-P | geometry R-P (± s.e.) | geometry change from the row before, paired (± s.e.) "
             "| shape score | shape change, paired (± s.e.) | shape margin |", "|---|---|---|---|---|---|---|"]
    for row, s in results.items():
        se = f" ± {s['geometry_se']:.2f}" if s.get("geometry_se") is not None else ""
        lines.append(f"| {row} | {s['colour_r_precision']:.2f} | {s['geometry_r_precision']:.2f}{se} | "
                     f"{_step(steps.get(row))} | {s['shape_score']:.2f} | {_step(shape_steps.get(row))} | "
                     f"{s['shape_margin']:+.2f} |")
    return "\n".join(lines)


def _present(rows: list[dict], order: list[str]) -> list[str]:
    """The rows of `order` that some run belongs to."""
    return [row for row in order if any(r["row"] == row for r in rows)]


def tabulate(rows: list[dict], order: list[str]) -> tuple[dict, str]:
    """Per-row summaries of the runs and the table text."""
    order = _present(rows, order)
    results = {row: summarize([r for r in rows if r["row"] == row]) for row in order}
    return results, table(results, paired_steps(rows, order), paired_steps(rows, order, key="shape_score"))


def power_table(rows: list[dict], order: list[str], z: float = 2.0) -> str:
    """Per step: its paired runs, mean change of geometry, the pairs' spread, its s.e., and how many pairs
    would put the sign `z` standard errors clear of zero at this mean and spread (`pairs_to_resolve`)."""
    order = _present(rows, order)
    lines = ["| step | pairs | mean change | s.d. of a pair | s.e. | pairs for the sign at "
             f"{z:g} s.e. |", "|---|---|---|---|---|---|"]
    for row, st in paired_steps(rows, order).items():
        need = pairs_to_resolve(st["mean"], st["sd"], z)
        sd, se = ("" if v is None else f"{v:.3f}" for v in (st["sd"], st["se"]))
        cell = "" if st["sd"] is None else ("never (mean 0)" if need is None else str(need))
        lines.append(f"| {row} | {st['n']} | {st['mean']:+.3f} | {sd} | {se} | {cell} |")
    return "\n".join(lines)


def write_benchmarks(text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    doc = path.read_text()
    block = f"{START}\n{text}\n{END}"
    if START in doc and END in doc:
        doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n## Ablation (paper Fig. 6) on the procedural world\n\n" + block + "\n"
    path.write_text(doc)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap, PROMPTS, steps=2000, seconds=300.0)
    ap.add_argument("--rows", nargs="+", default=list(ABLATION), choices=list(ABLATION))
    ap.add_argument("--seeds", type=int, default=1, help="seeds per prompt: --seed, --seed + 1, ...")
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("--out", default=None, help="also write every run's scores to this JSON file")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                    help="re-tabulate the runs of earlier --out FILEs (e.g. one per row) instead of running anything")
    ap.add_argument("--note", default=None, help="with --from-json: the note under the table (default: the files')")
    ap.add_argument("--power", action="store_true",
                    help="with --from-json: also print, per step, how many paired runs its sign needs")
    args = ap.parse_args(argv)
    if args.from_json:
        runs, notes = {}, []
        for f in args.from_json:
            saved = json.loads(Path(f).read_text())
            for r in saved["runs"]:  # a run saved twice (same row, prompt, seed) counts once: the later file's
                runs[(r["row"], r["prompt"], r["seed"])] = r
            if saved.get("note", "").strip() and saved["note"].strip() not in notes:
                notes.append(saved["note"].strip())
        results, text = tabulate(list(runs.values()), list(ABLATION))
        files = ", ".join(f"`{f}`" for f in args.from_json)
        note = "\n" + (args.note or " ".join(notes)).strip() + f" (Table re-tabulated from {files}.)"
        if args.power:
            note += "\n\n" + power_table(list(runs.values()), list(ABLATION))
    else:
        results, text, note = _run(args, argv)
    print(text + "\n" + note)
    if args.write:
        write_benchmarks(text + "\n" + note)
    return results


def _run(args, argv) -> tuple[dict, str, str]:
    """Run every (row, prompt, seed) job; the per-row results, the table and its note (written to --out too)."""
    seeds = range(args.seed, args.seed + max(1, args.seeds))
    jobs = [job_of(args, p, row=row, seed=seed) for row in args.rows for p in args.prompts for seed in seeds]
    t0 = time.perf_counter()
    rows = run_protocol(jobs, args.batch, workers=args.jobs)
    results, text = tabulate(rows, args.rows)
    wall = time.perf_counter() - t0
    cmd = "python -m lab.ablation " + shlex.join(argv if argv is not None else sys.argv[1:])
    note = (f"\nPrompts: {', '.join(args.prompts)}; ≤ {args.steps} steps / {args.seconds:.0f} s each, "
            f"seeds {seeds.start}–{seeds.stop - 1}, {args.views} views per score; "
            f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} single-thread workers; {wall / 60:.0f} min. "
            f"Command: `{cmd.strip()}`")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"runs": rows, "rows": results, "note": note.strip()}, indent=1))
    print(json.dumps(results))
    return results, text, note


if __name__ == "__main__":
    main()
