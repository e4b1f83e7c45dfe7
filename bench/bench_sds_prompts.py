"""The embedded prior's SDS protocol (issue 3): ten prompts, default settings, scored by the toy R-Precision.

Each prompt trains a fresh field from the embedded prior's defaults for at most --steps steps and
--seconds of wall time, then `engine.evaluate` scores 16 random views: colour R-Precision on shaded renders,
geometry R-Precision on textureless renders, and the silhouette score. Prompts run through the batch runner
(`engine.batch`, on Ray) in --jobs workers of one torch thread each (on 2 cores, two single-threaded runs beat
one two-threaded run); each run's checkpoint, preview and scores stay in the batch folder (--batch, default
runs/batch-<time>; the same folder again skips the runs done).

    python bench/bench_sds_prompts.py                        # 10 prompts, <= 2000 steps / 300 s each
    python bench/bench_sds_prompts.py --steps 200 --prompts "a red cube"   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.protocol import PROMPTS, add_run_args, job_of, run_protocol, summarize  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(ap, PROMPTS, steps=2000, seconds=300.0)
    ap.add_argument("--out", default="runs/protocol", help="folder for previews (shaded row, textureless row)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--save-runs", action="store_true", help="also save each run's checkpoint in OUT/<prompt>/")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [job_of(args, p, preview=str(out / (p.replace(" ", "_") + ".png")),
                   save=str(out / p.replace(" ", "_")) if args.save_runs else None) for p in args.prompts]
    t0 = time.perf_counter()
    rows = run_protocol(jobs, args.batch, workers=args.jobs)
    print("\n| prompt | colour R-P | geometry R-P | shape score | margin | steps | wall s | it/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r.get('colour_r_precision', 0):.2f} | {r.get('geometry_r_precision', 0):.2f} | "
              f"{r.get('shape_score', 0):.2f} | {r.get('shape_margin', 0):+.2f} | {r['steps']} | {r['wall_s']} | "
              f"{r['its_per_s']} |")
    summary = {**summarize(rows), "total_wall_s": round(time.perf_counter() - t0, 1), "steps_budget": args.steps,
               "seconds_budget": args.seconds, "jobs": args.jobs}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return summary


if __name__ == "__main__":
    main()
