"""Oracle reconstruction: steps and seconds until the field's density level set reaches IoU 0.9 against each
analytic solid, default config, learning rate 0.03, checked every 50 steps (BENCHMARKS.md "oracle
reconstruction"; tests/test_oracle_convergence.py asserts the IoU at cheaper settings).

    taskset -c 1 python bench/bench_oracle.py                 # all five solids, one torch thread
    python bench/bench_oracle.py --solids sphere,cube --set camera.batch_size=1
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from engine.batch.spec import parse_value  # noqa: E402
from engine.testing import ORACLE_BUDGET, steps_to_iou  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--solids", default=",".join(ORACLE_BUDGET), help="comma-separated analytic solids")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a dotted config setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {key: parse_value(value) for key, _, value in (item.partition("=") for item in args.set)}
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), "
          f"{datetime.date.today()}, settings {settings or 'default'}")
    print("| solid | IoU ≥ 0.9 after | training | with checks |\n|---|---|---|---|")
    for solid in args.solids.split(","):
        trainer, iou, training, wall = steps_to_iou(solid, settings=settings)
        mark = "" if iou >= 0.9 else " (not reached)"
        print(f"| {solid} | {trainer.step_count} steps ({iou:.3f}){mark} | {training:.0f} s | {wall:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
