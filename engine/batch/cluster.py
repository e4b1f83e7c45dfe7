"""The batch's Ray: connecting (`connect`), sizing the workers (`slots`), noticing that Ray died (`Watchdog`)
and stopping a local Ray within seconds even when it is half dead (`shutdown`).

Calls into a Ray whose node died can block for good, so every call here that may touch a dead Ray runs in a
thread with a timeout (`bounded`), and the Ray processes a local Ray started are also watched, and at the end
killed, by pid."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENTS = {"ray::RuntimeEnvAgent": "Ray's runtime-env agent", "ray::DashboardAgent": "Ray's dashboard agent"}
SERVICES = {"gcs_server": "Ray's GCS server", "raylet": "the local Ray node's raylet", **AGENTS}


class RayDied(RuntimeError):
    """The Ray node or cluster of a batch went down; the message says what died."""


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM asked the batch to stop."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def first_line(err) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def bounded(fn, timeout: float, default=None):
    """fn() in a daemon thread, waited on for at most `timeout` s: its result, `default` if it did not end in
    time (it goes on in the background) or raised."""
    box = []

    def call():
        try:
            box.append(fn())
        except Exception:  # noqa: BLE001 - a dying Ray raises anything
            pass

    thread = threading.Thread(target=call, daemon=True, name="ray-bounded")
    thread.start()
    thread.join(timeout)
    return box[0] if box else default


def check_ray(address: str = "") -> str:
    """Refusals before anything starts, in seconds: RuntimeError where Ray is not installed or nothing answers at
    `address`; else the host:port the batch will reach ("" for a new local Ray)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RuntimeError("Ray is not installed: pip install 'ray[client]==2.60.0' (see requirements.txt)") from None
    hostport = address.removeprefix("ray://")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address  # where `ray start` left its address

        try:
            hostport = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as err:
            raise RuntimeError(f"--address auto: no Ray cluster runs here ({first_line(err)})") from None
    if address and not answers(hostport):
        raise RuntimeError(f"no Ray cluster answers at {address}; start one with `ray start --head`")
    return hostport


def answers(hostport: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` s."""
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def connect(address: str = ""):
    """(ray, started, host:port or ""): a new local Ray when `address` is empty (unless this process already runs one), else the
    cluster at `address` ("auto", "host:port", "ray://host:port"). One-line RuntimeError, in seconds, when Ray
    is not installed or nothing answers at the address (Ray itself retries for 30 to 80 s)."""
    endpoint = check_ray(address)
    import ray

    if ray.is_initialized():
        return ray, False, endpoint
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    if address:  # ship engine/ and assets/ to the cluster's workers (.gitignore'd paths stay behind)
        ray.init(address=address, runtime_env={"working_dir": str(ROOT), "excludes": [".git"]}, **quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)  # a new instance, even where `ray start` ran
    return ray, True, endpoint


def slots(ray, cpus_per_run: float, gpus_per_run: float | None, workers: int | None, n_runs: int) -> tuple[float, int]:
    """(GPUs per run, workers) that the cluster's resources allow; RuntimeError if no run fits."""
    have = bounded(ray.cluster_resources, 30)
    if have is None:
        raise RayDied("the Ray cluster did not answer within 30 s")
    gpus = (1 if have.get("GPU", 0) >= 1 else 0) if gpus_per_run is None else gpus_per_run
    fit = int(have.get("CPU", 0) // cpus_per_run) if cpus_per_run else n_runs
    fit = min(fit, int(have.get("GPU", 0) // gpus)) if gpus else fit
    if fit < 1:
        raise RuntimeError(f"--gpus-per-run {gpus:g} --cpus-per-run {cpus_per_run:g}: no run fits the Ray cluster "
                           f"({have.get('GPU', 0):g} GPUs, {have.get('CPU', 0):g} CPUs)")
    return gpus, min(fit, workers or fit, n_runs)


def alive(proc) -> bool:
    """Whether a psutil.Process still runs (a zombie does not)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def service_name(proc) -> str | None:
    """The words for a Ray service process (raylet, GCS server, agents), None for anything else (or gone)."""
    argv = _cmdline(proc)
    head = Path(argv[0]).name if argv else ""
    if head in SERVICES:
        return SERVICES[head]
    script = next((a for a in argv[1:3] if a.endswith(("runtime_env/agent/main.py", "dashboard/agent.py"))), "")
    if script:  # an agent that has not renamed itself yet
        return AGENTS["ray::RuntimeEnvAgent" if "runtime_env" in script else "ray::DashboardAgent"]
    return next((w for t, w in AGENTS.items() if head.startswith(t)), None)


class ProcessTree:
    """The processes found under some top processes so far (a dead one stays, for `dead_service`), each named
    once while it runs."""

    def __init__(self):
        self.procs: dict = {}  # pid -> psutil.Process
        self.names: dict = {}  # pid -> service words, or None
        self.raylet_log: dict = {}  # a raylet's pid -> its raylet.out (it says which agent took it down)

    def add(self, tops) -> None:
        """Add `tops` (psutil.Process) and every process under them."""
        import psutil

        for top in tops:
            try:
                found = [top, *top.children(recursive=True)]
            except psutil.Error:
                found = [top]
            for p in found:
                self.procs.setdefault(p.pid, p)
        for pid, p in self.procs.items():
            if self.names.get(pid) is None and alive(p):
                self.names[pid] = service_name(p)
                if self.names[pid] == SERVICES["raylet"]:
                    self.raylet_log[pid] = next((a.partition("=")[2] for a in _cmdline(p)
                                                 if a.startswith("--stdout_filepath=")), None)

    def dead_service(self) -> str | None:
        """What died first among the Ray services seen, in words; None while all run. An agent that dies takes
        its raylet down, and the raylet then stops the other agent: its log says which agent went first."""
        dead = [(w, pid) for pid, w in self.names.items() if w and not alive(self.procs[pid])]
        for pid in (pid for w, pid in dead if pid in self.raylet_log):
            agent = _failed_agent(self.raylet_log[pid])
            if agent:
                return f"{agent} ({', '.join(f'pid {p}' for w, p in dead if w == agent) or 'pid ?'}) died"
        order = [SERVICES["gcs_server"], SERVICES["raylet"], *AGENTS.values()]
        dead.sort(key=lambda d: order.index(d[0]))
        return f"{dead[0][0]} (pid {dead[0][1]}) died" if dead else None


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _failed_agent(log: str | None) -> str | None:
    """The agent a raylet's log (raylet.out) says it went down with, in words; None if it says none."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 256_000))
            tail = fh.read().decode(errors="replace")
    except (OSError, TypeError):
        return None
    found = re.findall(r"one Ray agent failed, agent_name = (\w+)", tail)
    return {"runtime_env_agent": AGENTS["ray::RuntimeEnvAgent"],
            "dashboard_agent": AGENTS["ray::DashboardAgent"]}.get(found[-1]) if found else None


def local_processes(ray) -> list:
    """psutil.Process of the top processes of the local Ray this process started (GCS server, raylet...: the
    agents and workers are under the raylet), [] when it started none."""
    import psutil

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.is_head():
        return []
    procs = []
    for infos in list(node.all_processes.values()):
        for info in infos:
            try:
                procs.append(psutil.Process(info.process.pid))
            except psutil.Error:
                pass
    return procs


def kill_all(procs, grace: float = 2.0) -> None:
    """SIGTERM every process of `procs` still running, SIGKILL those still there after `grace` s."""
    import psutil

    procs = [p for p in {p.pid: p for p in procs}.values() if alive(p)]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=grace)


class Watchdog:
    """Checks every `period` s, in a thread, that the batch's Ray lives, and keeps the first thing it finds dead
    in `dead` (words), also telling `on_dead(words)`. A local Ray of this process: its raylet, GCS server and
    agents, by pid (a dead raylet is seen within a period). A cluster: its address answers (TCP), and every
    5 s `ray.nodes()` answers within 20 s and lists this driver's node, and some node, alive (a lost node is
    seen when its GCS gives up on it, within ~30 s)."""

    def __init__(self, ray, address: str = "", endpoint: str = "", period: float = 1.0, on_dead=None):
        self.ray, self.address, self.endpoint, self.period = ray, address, endpoint, period
        self.on_dead = on_dead or (lambda words: None)
        self.dead: str | None = None
        self.tops = local_processes(ray)  # the local Ray this process started, if any
        self.tree = ProcessTree()  # its processes, agents and workers included
        self.tree.add(self.tops)
        self.node_id = None if self.tops else bounded(lambda: ray.get_runtime_context().get_node_id(), 10)
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ray-watchdog")

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._quit.set()

    def _loop(self) -> None:
        last_nodes = time.monotonic()
        while not self._quit.wait(self.period) and self.dead is None:
            nodes = time.monotonic() - last_nodes >= 5
            last_nodes = time.monotonic() if nodes else last_nodes
            what = self.check(nodes)
            if what and not self._quit.is_set():
                self.dead = what
                self.on_dead(what)

    def check(self, nodes: bool = True) -> str | None:
        """What died, in words; None while Ray lives."""
        if self.tops:
            what = self.tree.dead_service()
            self.tree.add(self.tops)
            return f"{what}, taking the local Ray node down" if what else None
        where = f"the Ray cluster at {self.address or self.endpoint}"
        if self.endpoint and not answers(self.endpoint):
            return f"{where} stopped answering"
        return self._check_nodes(where) if nodes else None

    def _check_nodes(self, where: str) -> str | None:
        listed = bounded(self.ray.nodes, 20)
        if listed is None:
            return f"{where} did not answer within 20 s"
        if not any(n.get("Alive") for n in listed):
            return f"every node of {where} died"
        mine = [n for n in listed if n.get("NodeID") == self.node_id]
        if mine and not mine[0].get("Alive"):
            return f"the Ray node of this batch's driver ({mine[0].get('NodeManagerAddress')}) died"
        return None


def shutdown(ray, procs, timeout: float = 4.0) -> None:
    """ray.shutdown() for at most `timeout` s (on a dead node it can block for good; then Ray's own shutdown at
    exit is dropped too), then kill every process of `procs` (the local Ray it started) still there."""
    import atexit

    if not bounded(lambda: ray.shutdown() or True, timeout, False):
        atexit.unregister(ray.shutdown)
    kill_all(procs)
