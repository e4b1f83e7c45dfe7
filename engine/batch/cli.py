"""`python -m engine batch`: the subcommand, its refusals, and the one line it ends with.

Exit status: 0 every run done, 1 some failed, 2 a refusal (or a worker that could not start), 3 Ray died under
the batch (a node or the cluster; the same command resumes), 130 after SIGINT (Ctrl-C), 143 after SIGTERM."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path

from engine.batch.spec import EXPORTS, RunOutputs, expand, parse_grid, parse_seeds

EXIT_RAY_DIED = 3


def add_parser(sub) -> None:
    """The `batch` subcommand of `python -m engine` (`sub`: argparse subparsers)."""
    from engine.priors import PRIOR_HELP

    b = sub.add_parser("batch", help="many runs on Ray: prompts x seeds x settings, with a manifest and a gallery")
    b.add_argument("prompts_file", nargs="?", help="prompts, one a line; 'PROMPT | KEY=VALUE ...' sets values for "
                   "that line; blank lines and # comments are skipped")
    b.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    b.add_argument("--seeds", default="0", help="seeds of each prompt: 0-3, or 0,2,5")
    b.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values to sweep: section.field, live.<name>, prior or steps; several grids multiply")
    b.add_argument("--steps", type=int, default=None, help="training steps (default: the prior preset's)")
    b.add_argument("--prior", default="embedded", help=f"prior: {PRIOR_HELP}")
    b.add_argument("--export", default="", help=f"exports of each run, comma-separated: {','.join(EXPORTS)}")
    b.add_argument("--score-at", default="", metavar="STEPS", help="also score each run on the way at these steps, "
                   "e.g. 500,1000 (manifest rows' \"scores\")")
    b.add_argument("--out", default="outputs/batch", help="batch folder: DIR/<run-id>/, manifest, index.html")
    b.add_argument("--address", default="", help="empty: a Ray of its own on this machine; auto, host:port or "
                   "ray://host:10001: a running cluster")
    b.add_argument("--gpus-per-run", type=float, default=None, help="default: 1 where there are GPUs, else 0")
    b.add_argument("--cpus-per-run", type=float, default=1, help="CPUs (torch threads) per run")
    b.add_argument("--workers", type=int, default=None, help="runs at once (default: as many as fit)")
    b.add_argument("--max-retries", type=int, default=2, help="times a run whose worker died is resumed")
    b.add_argument("--checkpoint-every", type=int, default=200, help="steps between the checkpoints sent back")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=cmd_batch)


def cmd_batch(args) -> int:
    """Refuse (ValueError, RuntimeError) in seconds before anything starts, else run the batch in a supervised
    driver process (supervise.py) and print its one last line: the JSON summary on stdout, or on stderr what
    stopped it and the command that resumes it."""
    from engine.batch.cluster import check_ray
    from engine.batch.driver import prepare
    from engine.batch.supervise import supervise

    lines = [ln for ln in Path(args.prompts_file).read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")] if args.prompts_file else []
    if not lines + args.prompt:
        raise ValueError("no prompts: give a prompts file and/or --prompt")
    runs = expand(lines + args.prompt, parse_seeds(args.seeds), parse_grid(args.grid), args.prior, args.steps)
    outputs = RunOutputs(exports=tuple(e.strip() for e in args.export.split(",") if e.strip()),
                         score_at=tuple(parse_seeds(args.score_at)) if args.score_at else ())
    out = Path(args.out)
    prepare(runs, out, outputs, args.gpus_per_run, args.address)
    check_ray(args.address)
    outcome = supervise(dict(runs=runs, out=out, outputs=outputs, address=args.address, workers=args.workers,
                             cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                             max_retries=args.max_retries, checkpoint_every=args.checkpoint_every,
                             progress=not args.quiet))
    resume = "python -m engine " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    return report(outcome, out, len(runs), resume)


def report(outcome, out: Path, n_runs: int, resume: str) -> int:
    """Print how the batch ended in one line; its exit status."""
    from engine.batch.manifest import settle

    if outcome.kind == "result":
        count = outcome.detail
        print(json.dumps({"out": str(out), "runs": n_runs, **count, "gallery": str(out / "index.html")}))
        return 1 if count.get("failed") else 0
    if outcome.kind == "error":
        raise RuntimeError(outcome.detail)
    done = settle(out).get("done", 0)  # runs left "running" by a killed driver are pending again
    kept = f"{done} of {n_runs} runs done, checkpoints kept in {out}; resume with: {resume}"
    if outcome.kind == "stopped":
        word = "interrupted" if outcome.detail == signal.SIGINT else "terminated"
        print(f"{word}: {kept}", file=sys.stderr)
        return 130 if outcome.detail == signal.SIGINT else 143
    print(f"stopped: {outcome.detail}; {kept}", file=sys.stderr)
    return EXIT_RAY_DIED
