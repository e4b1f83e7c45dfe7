"""Batch generation on Ray: prompts x seeds x settings grids, on one machine or a cluster (issues 28, 34).

    python -m engine batch prompts.txt --seeds 0-3 --grid live.guidance_scale=10,20 --out runs/b1

The driver starts one `Worker` actor per slot (a GPU, or `cpus_per_run` CPU threads). A worker loads each
prior once and advances one run `checkpoint_every` steps per call; each call returns the run's checkpoint as
safetensors bytes, the last also its evaluation and exports, so no shared filesystem is needed: the driver
writes everything atomically under DIR/<run-id>/ and keeps DIR/manifest.json, .csv and index.html current.
When a worker dies another resumes its run from the last checkpoint, bit-identical on CPU to an unbroken run;
when Ray itself dies, or SIGINT/SIGTERM comes, the batch stops within seconds and the same command resumes it.

    spec.py       RunSpec, RunOutputs, parsing of lines, seeds and grids (expand), run_config
    worker.py     Worker: the Ray actor that trains, scores and exports
    driver.py     run_batch and its driver loop; SIGINT/SIGTERM
    cluster.py    connecting to Ray, the watchdog that finds it dead, a bounded shutdown
    manifest.py   the batch folder: manifest.json/.csv (atomic), resuming from checkpoints
    gallery.py    index.html
    cli.py        `python -m engine batch`: a supervisor process around a driver process (child.py)
"""

from engine.batch.cli import add_parser, cmd_batch
from engine.batch.cluster import ROOT, RayDied, Stopped, connect
from engine.batch.driver import run_batch
from engine.batch.gallery import write_gallery
from engine.batch.manifest import CSV_COLUMNS, batch_key, open_folder, write_manifest
from engine.batch.spec import (
           EXPORTS,
           SCORE_KEYS,
           RunOutputs,
           RunSpec,
           expand,
           parse_grid,
           parse_line,
           parse_seeds,
           parse_value,
           run_config,
)
from engine.batch.worker import Worker

__all__ = ["CSV_COLUMNS", "EXPORTS", "ROOT", "SCORE_KEYS", "RayDied", "RunOutputs", "RunSpec", "Stopped", "Worker",
           "add_parser", "batch_key", "cmd_batch", "connect", "expand", "open_folder", "parse_grid", "parse_line",
           "parse_seeds", "parse_value", "run_batch", "run_config", "write_gallery", "write_manifest"]
