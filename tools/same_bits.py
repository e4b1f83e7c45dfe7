"""Seeded runs of two versions of the engine, side by side in one process: are their bits the same?

Torch promises bit-identity on one machine, not across CPUs, so a refactor is checked by running the code before
and after it here, now, in one process (never against digests recorded elsewhere). The older version is taken
from git (`git archive REV engine assets`) into a temp folder; each version runs `python -m engine run` through
its own `engine.__main__.main` (the CLI is what both versions share), and the whole trainer state of each run
(weights, Adam moments, occupancy grid, generator: checkpoint.safetensors) and its last loss are compared.

    python tools/same_bits.py --before 7dec6d0             # that commit against the working tree
    python tools/same_bits.py --before HEAD~3 --after HEAD  # two commits

Prints one line per case and a JSON summary; exits 1 when any case differs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, CLI arguments): each runs past its occupancy warm-up and through every shading mode's first steps
CASES = {
    "embedded": ["--prompt", "a red cube", "--prior", "embedded", "--steps", "24", "--seed", "3"],
    "oracle_cube_grid": ["--prompt", "a red cube", "--prior", "oracle:cube", "--steps", "24", "--seed", "3"],
    "oracle_cube_hash": ["--prompt", "a red cube", "--prior", "oracle:cube", "--steps", "8", "--seed", "3",
                         "--backbone", "hash", "--resolution", "12"],
}


def checkout(rev: str, dest: Path) -> Path:
    """engine/ and assets/ of `rev` under dest (a folder that imports as the project root)."""
    data = subprocess.run(["git", "archive", rev, "engine", "assets"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_version(root: Path, cases: dict[str, list[str]], out: Path) -> dict[str, tuple[dict, float]]:
    """Each case run by the engine under `root`, imported fresh: {name: (tensors, last loss)}."""
    import torch
    from safetensors.torch import load_file

    for name in [m for m in sys.modules if m == "engine" or m.startswith("engine.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        from engine.__main__ import main

        results = {}
        for name, args in cases.items():
            folder = out / name
            torch.set_num_threads(1)
            with contextlib.redirect_stdout(io.StringIO()):
                rc = main(["run", *args, "--quiet", "--out", str(folder)])
            if rc != 0:
                raise RuntimeError(f"{root}: case {name} exited with {rc}")
            loss = json.loads((folder / "metrics.json").read_text())["final"]["loss"]
            results[name] = (load_file(folder / "checkpoint.safetensors"), loss)
        return results
    finally:
        sys.path.remove(str(root))


def compare(before: dict, after: dict) -> dict[str, dict]:
    """Per case: whether every tensor (same names) and the last loss are bit-identical."""
    import torch

    report = {}
    for name, (ta, la) in before.items():
        tb, lb = after[name]
        differ = sorted(k for k in ta.keys() | tb.keys() if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
        report[name] = {"identical": not differ and la == lb, "tensors": len(ta), "differ": differ[:5],
                        "loss_before": la, "loss_after": lb}
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="git revision of the older code")
    ap.add_argument("--after", default=None, help="git revision of the newer code (default: the working tree)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = ap.parse_args(argv)
    cases = {k: CASES[k] for k in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = run_version(checkout(args.before, tmp / "before"), cases, tmp / "out-before")
        after_root = checkout(args.after, tmp / "after") if args.after else ROOT
        after = run_version(after_root, cases, tmp / "out-after")
    report = compare(before, after)
    for name, r in report.items():
        print(f"{name}: {'bit-identical' if r['identical'] else 'DIFFERENT'} ({r['tensors']} tensors, last loss "
              f"{r['loss_before']!r} / {r['loss_after']!r}){' differ: ' + ', '.join(r['differ']) if r['differ'] else ''}")
    print(json.dumps({"before": args.before, "after": args.after or "working tree", "cases": report}))
    return 0 if all(r["identical"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
