"""The embedded prior's SDS protocol (issue 3): ten prompts, default settings, scored by the toy R-Precision.

Each prompt trains a fresh field from the embedded prior's defaults for at most --steps steps and
--seconds of wall time, then `engine.evaluate` scores 16 random views: colour R-Precision on shaded renders,
geometry R-Precision on textureless renders, the silhouette score and the translucent share. Prompts run
through the batch runner (`engine.batch`, on Ray) in --jobs workers of one torch thread each (on 2 cores, two
single-threaded runs beat one two-threaded run); each run's checkpoint, preview and scores stay in the batch
folder (--batch, default runs/batch-<time>; the same folder again skips the runs done).

--grid KEY=V1,V2 and --seeds 0,1 repeat the protocol for each setting and seed, seed by seed, and print one
summary row per setting (over prompts and seeds). --json FILE keeps every run's scores; the same FILE again
skips the runs it holds, so a long protocol goes on where it stopped, even from another machine.

    python bench/bench_sds_prompts.py                        # 10 prompts, <= 2000 steps / 300 s each
    python bench/bench_sds_prompts.py --steps 200 --prompts "a red cube"   # a quick look
    python bench/bench_sds_prompts.py --seconds 900 --seeds 0,1 --grid live.distillation=sds,csd,nfsd,ism,vsd \\
        --json bench/results/distill_protocol.json          # the distillation table (BENCHMARKS.md)
    python bench/bench_sds_prompts.py --report --examples --json bench/results/distill_protocol.json
        # the tables again, and whether each of the pane's example prompts forms well at both seeds
    RAY_worker_niceness=0 nice -n 10 taskset -c 1 python bench/bench_sds_prompts.py --jobs 1 --seeds 0,1 --seconds 900 \
        --eval-at 250,500,1000,2000 --grid field.backbone=grid,gaussians --json bench/results/fields_protocol.json \
        --out runs/fields_protocol --batch runs/fields_protocol
        # NeRF against splats, each run scored at 250 / 500 / 1000 / 2000 steps with its training seconds to each
        # (RAY_worker_niceness=0: Ray would renice its worker by +15, to 19, under the nice 10)

The protocol's code is `lab/sweep.py` (tests/lab/test_protocol.py tests it); this file is its command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lab.sweep import main as sweep  # noqa: E402


def examples_report(rows: list[dict], group: str = "live.distillation=sds", seeds=(0, 1)) -> list[str]:
    """Whether each of the pane's example prompts forms well in the protocol: colour >= 0.9 and geometry >= 0.8 in
    `group` at each of `seeds`. One line per example; "FAIL" lines for the ones that do not (or lack a seed)."""
    from playground.panel import EXAMPLES

    lines = []
    for prompt in EXAMPLES:
        runs = {r["seed"]: r for r in rows if r.get("prompt") == prompt and r.get("group") == group
                and r.get("status") == "done"}
        ok = set(seeds) <= set(runs) and all(runs[s]["colour_r_precision"] >= 0.9
                                             and runs[s]["geometry_r_precision"] >= 0.8 for s in seeds)
        scores = ", ".join(f"seed {s}: {runs[s]['colour_r_precision']:.2f} / {runs[s]['geometry_r_precision']:.2f}"
                           if s in runs else f"seed {s}: missing" for s in seeds)
        lines.append(f"{'ok  ' if ok else 'FAIL'} {prompt!r} (colour / geometry) {scores}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", action="store_true",
                    help="also check the pane's example prompts: colour >= 0.9, geometry >= 0.8 at seeds 0 and 1 "
                         "in the live.distillation=sds setting (exit 1 when one does not)")
    result = sweep(argv, parser=ap)
    if not result["args"].examples:
        return 0
    args = result["args"]  # every run --json holds (whatever options made it), else the runs of these options
    rows = json.loads(Path(args.json).read_text())["rows"] if args.json and Path(args.json).exists() else result["rows"]
    lines = examples_report(rows)
    print("\nthe pane's example prompts in the protocol:\n" + "\n".join(lines))
    return 1 if any(ln.startswith("FAIL") for ln in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
