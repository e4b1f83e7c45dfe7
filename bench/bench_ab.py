"""A/B of two checkouts' training-step speed on this 2-core machine: both at once, one per core, then
swapped, so both see the same machine (absolute figures here move by ±15 % minute to minute).

    git worktree add /tmp/base <rev>
    python bench/bench_ab.py /tmp/base .            # 64² and 32², oracle:cube, grid backbone
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1] + "/bench"); sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from bench_step import make
from engine.config import LiveParams
live = LiveParams(prompt="a red cube", shading="lambertian")
tr = make("grid", int(sys.argv[2]), True)
tr.step_count = 10**6  # past the warm-ups: the occupancy grid is in use
for _ in range(3):
    tr.step(live)
t = time.perf_counter()
for _ in range(int(sys.argv[3])):
    tr.step(live)
print(int(sys.argv[3]) / (time.perf_counter() - t))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", help="checkout A (e.g. the old code)")
    ap.add_argument("b", help="checkout B")
    ap.add_argument("--res", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    roots = [os.path.abspath(args.a), os.path.abspath(args.b)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("| res | A it/s (core 0, core 1) | B it/s (core 1, core 0) | B / A |")
    print("|---|---|---|---|")
    for res in args.res:
        rates: dict[int, list[float]] = {0: [], 1: []}
        for swap in (0, 1):
            procs = [subprocess.Popen(["taskset", "-c", str(i ^ swap), sys.executable, "-c", CHILD, root, str(res),
                                       str(args.steps)], stdout=subprocess.PIPE, text=True, env=env)
                     for i, root in enumerate(roots)]
            for i, p in enumerate(procs):
                out, _ = p.communicate()
                if p.returncode:
                    sys.exit(f"checkout {roots[i]} failed at {res}²")
                rates[i].append(float(out.strip().splitlines()[-1]))
        a, b = rates[0], rates[1]
        print(f"| {res}² | {a[0]:.2f}, {a[1]:.2f} | {b[0]:.2f}, {b[1]:.2f} | {sum(b) / sum(a):.2f}× |", flush=True)


if __name__ == "__main__":
    main()
