"""How `dssgd run` starts its services on this host: forked from one warm parent, or supervisord.

A fresh interpreter per service pays for importing PyTorch (about 1.5 s) once per process,
serially on a small machine; on 2 cores that was most of the time the default run needed to
reach its target (docs/BENCHMARKS.md, section 4).
The fork launcher imports everything once in `dssgd run` and forks the aggregator and the
workers from it, with what supervisor gave the services before: one log file each, restart on an
unexpected exit, SIGTERM to stop and SIGKILL after a grace period. Supervisor stays available
(`--launcher supervisor`) and is what deployments use (deploy/supervisord.conf).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dssgd.restart import (
    BACKOFF,
    EXITED,
    FATAL,
    PERMANENT_EXIT_CODES,
    RUNNING,
    STOPPED,
    RestartPolicy,
)
from dssgd.shared.config import Connections
from dssgd.shared.errors import DssgdError

__all__ = ["BACKOFF", "EXITED", "FATAL", "RUNNING", "STOPPED", "ForkLauncher", "RestartPolicy"]

log = logging.getLogger("dssgd.launcher")

_PR_SET_PDEATHSIG = 1


class Launcher(Protocol):
    def start(self) -> None: ...

    def states(self) -> dict[str, str]: ...

    def restarts(self) -> dict[str, int]: ...

    def stop_workers(self) -> None: ...

    def stop_aggregator(self) -> None: ...

    def shutdown(self) -> None: ...


def service_argv(run_id: str, workers: int, conns: Connections) -> dict[str, list[str]]:
    """The `dssgd` command line of every service of a local run, by process name."""
    urls = ["--amqp-url", conns.amqp_url, "--redis-url", conns.redis_url]
    programs = {"aggregator": ["aggregator", "--run-id", run_id, "--metrics-port", "0", *urls]}
    for i in range(workers):
        # A stable worker id: a restarted worker takes back its own participant leases at once.
        programs[f"worker:worker-{i}"] = ["worker", "--run-id", run_id, "--slot", f"{i}/{workers}"]
        programs[f"worker:worker-{i}"] += ["--worker-id", f"{run_id}-worker-{i}", *urls]
    return programs


def preload() -> None:
    """Import what the services need, so each forked child starts warm.

    Nothing may start a thread or run a PyTorch operation here: a child forked from a process
    with running threads (an OpenMP pool, an I/O thread) can inherit a lock held forever.
    """
    warm = ("torch", "dssgd.aggregator.evaluator", "dssgd.aggregator.service")
    for module in (*warm, "dssgd.worker.service"):
        importlib.import_module(module)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGTERM this child if `dssgd run` dies, so no service outlives its run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _child_main(
    entry: Callable[[list[str]], int] | None, argv: list[str], log_path: Path, parent: int
) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        # Own process group: Ctrl-C in the terminal reaches `dssgd run` only, which then stops
        # the workers first and the aggregator once every confirmed update is applied.
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent(parent)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        # The inherited sys.stdout/sys.stderr may be wrappers (a test runner's capture, say).
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        if entry is None:  # the service commands, without the CLI (it imports us)
            from dssgd.services import service_main as entry
        code = entry(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


@dataclass
class _Proc:
    name: str
    argv: list[str]
    ok_codes: frozenset[int]
    log_path: Path
    pid: int | None = None
    state: str = STOPPED
    exit_code: int | None = None
    restart_at: float = 0.0
    started_at: float = 0.0
    exits: list[float] = field(default_factory=list)  # unexpected exits within the window
    failed_starts: int = 0  # exits before `startsecs`, in a row
    restarts: int = 0
    stopping: bool = False


class ForkLauncher:
    """Forks each service from this (pre-imported) process and keeps them running.

    Restarts follow `RestartPolicy` (supervisor's semantics, with a capped backoff): a service
    that keeps getting killed after it started is restarted every time; only a crash loop at
    start, or a permanent exit code, makes it FATAL, and then `dssgd run` stops with the log to
    read.
    """

    def __init__(
        self,
        run_dir: Path,
        programs: dict[str, list[str]],
        entry: Callable[[list[str]], int] | None = None,
        warm_up: Callable[[], None] = preload,
        grace: float = 20.0,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.run_dir = run_dir.resolve()
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.entry = entry
        self.warm_up = warm_up
        self.grace = grace
        self.policy = policy or RestartPolicy()
        self.procs: dict[str, _Proc] = {}
        for name, argv in programs.items():
            # 75: fenced off by a newer aggregator of the run; restarting would take it back.
            ok = frozenset({0, 75}) if name == "aggregator" else frozenset({0})
            self.procs[name] = _Proc(name, argv, ok, self.logs / f"{name.split(':')[-1]}.log")

    def start(self) -> None:
        self.warm_up()
        if threading.active_count() > 1:
            # Not fatal, but worth knowing if a child ever hangs on an inherited lock.
            log.debug("forking with %d threads alive", threading.active_count())
        for proc in self.procs.values():  # aggregator first: it creates the run's parameters
            self._spawn(proc)

    def _spawn(self, proc: _Proc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child_main(self.entry, proc.argv, proc.log_path, parent)
        proc.pid, proc.state, proc.exit_code, proc.stopping = pid, RUNNING, None, False
        proc.started_at = time.monotonic()
        log.debug("started %s (pid %d)", proc.name, pid)
        self._write_pids()

    def _write_pids(self) -> None:
        # Forked children keep the parent's command line, so `ps` cannot tell them apart: the
        # run folder says which pid is which (for operators, and for bench/ CPU accounting).
        pids = {n: p.pid for n, p in self.procs.items() if p.pid is not None}
        tmp = self.run_dir / "pids.json.tmp"
        tmp.write_text(json.dumps(pids, indent=1) + "\n")
        tmp.replace(self.run_dir / "pids.json")

    def _reap(self) -> None:
        now = time.monotonic()
        for proc in self.procs.values():
            if proc.state == BACKOFF and now >= proc.restart_at:
                proc.restarts += 1
                self._spawn(proc)
                continue
            if proc.pid is None or proc.state != RUNNING:
                continue
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = proc.pid, 0
            if pid == 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            proc.pid, proc.exit_code = None, code
            if proc.stopping or code in proc.ok_codes:
                proc.state = STOPPED if proc.stopping else EXITED
                continue
            self._unexpected_exit(proc, code, now)

    def _unexpected_exit(self, proc: _Proc, code: int, now: float) -> None:
        """Restart after the policy's backoff, or give up (FATAL) with the log to read."""
        policy = self.policy
        up = now - proc.started_at
        proc.failed_starts = proc.failed_starts + 1 if up < policy.startsecs else 0
        proc.exits = [t for t in proc.exits if now - t < policy.window] + [now]
        why = ""
        if code in PERMANENT_EXIT_CODES:
            meaning = "bad input" if code == 2 else "a password or right refused"
            why = f"exit code {code} ({meaning}) would come back on every restart"
        elif proc.failed_starts > policy.startretries:
            why = (
                f"it could not stay up for {policy.startsecs:g} s "
                f"{proc.failed_starts} times in a row (last exit code {code})"
            )
        if why:
            proc.state = FATAL
            log.error("%s is FATAL: %s; see %s", proc.name, why, proc.log_path)
            return
        delay = policy.delay(len(proc.exits))
        log.warning(
            "%s exited with code %d after %.1f s; restarting in %.1f s (log: %s)",
            proc.name,
            code,
            up,
            delay,
            proc.log_path,
        )
        proc.state, proc.restart_at = BACKOFF, now + delay

    def states(self) -> dict[str, str]:
        """Reap exited children, start those whose backoff is over; every service's state.

        BACKOFF is a restart on its way (as under supervisor): only FATAL ends a run.
        """
        self._reap()
        return {n: p.state for n, p in self.procs.items()}

    def restarts(self) -> dict[str, int]:
        return {n: p.restarts for n, p in self.procs.items()}

    def _stop(self, names: list[str]) -> None:
        procs = [self.procs[n] for n in names]
        for proc in procs:
            if proc.state == BACKOFF:
                proc.state = STOPPED
            if proc.pid is not None and proc.state == RUNNING:
                proc.stopping = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                    # Like systemd: a stopped (SIGSTOPped) process must wake up to see SIGTERM.
                    os.kill(proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + self.grace
        while any(p.state == RUNNING for p in procs) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for proc in procs:
            if proc.state == RUNNING and proc.pid is not None:
                log.warning("%s ignored SIGTERM for %.0f s; killing it", proc.name, self.grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, 0)
                proc.pid, proc.state = None, STOPPED

    def stop_workers(self) -> None:
        self._stop([n for n in self.procs if n.startswith("worker:")])

    def stop_aggregator(self) -> None:
        self._stop(["aggregator"])

    def shutdown(self) -> None:
        self._stop(list(self.procs))


def make_launcher(
    kind: str, run_dir: Path, run_id: str, workers: int, conns: Connections
) -> Launcher:
    if kind == "fork":
        if not hasattr(os, "fork"):
            raise DssgdError("--launcher fork needs os.fork; use --launcher supervisor here")
        return ForkLauncher(run_dir, service_argv(run_id, workers, conns))
    from dssgd.supervisor import Supervisor, render_config

    return Supervisor(run_dir, render_config(run_dir.resolve(), run_id, workers, conns))
