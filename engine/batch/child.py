"""The driver process of `python -m engine batch` (see supervise.py): reads `run_batch`'s keyword arguments
(pickled) from stdin, runs the batch and writes JSON lines to its stdout for the supervisor: {"shutdown": true}
before it stops its local Ray, {"dead": words} as soon as its watchdog finds Ray dead, and its last word,
{"result": {status: count}}, {"stopped": signum}, {"dead": words} or {"error": message}."""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import signal
import sys
import threading
from collections import Counter


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when the supervisor goes (Linux; elsewhere the supervisor's kill must do)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it went before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    messages = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed here (Ray's notes) goes to stderr
    lock = threading.Lock()

    def send(**msg) -> None:
        with lock:
            messages.write(json.dumps(msg) + "\n")
            messages.flush()

    _die_with_parent(int(os.environ.get("ENGINE_BATCH_SUPERVISOR", os.getppid())))
    job = pickle.load(sys.stdin.buffer)
    from engine.batch.cluster import RayDied, Stopped, first_line
    from engine.batch.driver import run_batch

    try:
        rows = run_batch(**job, on_event=lambda e: e["kind"] == "shutdown" and send(shutdown=True),
                         on_dead=lambda words: send(dead=words))
        send(result=dict(Counter(r["status"] for r in rows)))
    except Stopped as stop:
        send(stopped=stop.signum)
    except KeyboardInterrupt:
        send(stopped=signal.SIGINT)
    except RayDied as err:
        send(dead=str(err))
    except (RuntimeError, ValueError, OSError) as err:
        send(error=first_line(err))
    except Exception as err:  # noqa: BLE001 - a dying Ray raises anything; the supervisor says what died
        send(error=f"{type(err).__name__}: {first_line(err)}")
    finally:
        messages.flush()
        os._exit(0)  # not Ray's exit hooks: they can block on a dead node


if __name__ == "__main__":
    main()
