"""The fork launcher of `dssgd run`: restarts, stops, logs, and no child outliving its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from dssgd.shared.config import Connections

from dssgd.launcher import (
    EXITED,
    FATAL,
    RUNNING,
    STOPPED,
    ForkLauncher,
    RestartPolicy,
    service_argv,
)
from testing.runs import ROOT


def entry(argv: list[str]) -> int:
    """Stands in for `dssgd.services.service_main` in the children."""
    what = argv[0]
    print(f"child {what} {os.getpid()}", flush=True)
    if what == "exit":
        return int(argv[1])
    if what == "crash":
        raise RuntimeError("boom")
    if what == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if what == "graceful":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(0.05)


# supervisor's semantics on a short clock: up 0.2 s counts as started; backoff 0.05 s to 0.2 s.
FAST = RestartPolicy(startsecs=0.2, startretries=3, base=0.05, cap=0.2)


def launcher(tmp_path: Path, programs: dict[str, list[str]], **kw: object) -> ForkLauncher:
    kw.setdefault("policy", FAST)
    return ForkLauncher(tmp_path, programs, entry=entry, warm_up=lambda: None, **kw)  # type: ignore[arg-type]


def wait_for(fl: ForkLauncher, name: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fl.states()[name] == state:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name} is {fl.states()[name]}, expected {state}")


def test_expected_exits_are_not_restarted_and_output_goes_to_the_log(tmp_path: Path) -> None:
    fl = launcher(tmp_path, {"aggregator": ["exit", "75"], "worker:worker-0": ["exit", "0"]})
    fl.start()
    wait_for(fl, "aggregator", EXITED)  # 75: fenced off by a newer aggregator, not a crash
    wait_for(fl, "worker:worker-0", EXITED)
    time.sleep(0.7)
    assert set(fl.states().values()) == {EXITED}
    assert (tmp_path / "logs" / "aggregator.log").read_text().count("child exit") == 1
    assert (tmp_path / "logs" / "worker-0.log").read_text().startswith("child exit")


def test_a_crash_loop_at_start_goes_fatal(tmp_path: Path) -> None:
    fl = launcher(tmp_path, {"worker:worker-0": ["crash"]})
    fl.start()
    wait_for(fl, "worker:worker-0", FATAL)
    log = (tmp_path / "logs" / "worker-0.log").read_text()
    # Started, then restarted `startretries` times, each dying before `startsecs`: given up.
    assert log.count("child crash") == 1 + FAST.startretries
    assert log.count("RuntimeError: boom") == 4  # the traceback is in the service's log


def test_a_service_killed_after_staying_up_is_restarted_every_time(tmp_path: Path) -> None:
    """Six SIGKILLs within a second or two, each after the service was up for its start time:
    restarted every time (the old launcher gave up after five exits within 60 s)."""
    policy = RestartPolicy(startsecs=0.1, startretries=3, base=0.02, cap=0.05)
    fl = launcher(tmp_path, {"aggregator": ["sleep"]}, policy=policy)
    fl.start()
    pids = []
    for _ in range(6):
        wait_for(fl, "aggregator", RUNNING)
        pid = fl.procs["aggregator"].pid
        assert pid is not None and pid not in pids
        pids.append(pid)
        time.sleep(policy.startsecs + 0.05)  # stayed up: a started service, not a crash loop
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2
        while fl.procs["aggregator"].pid == pid and time.monotonic() < deadline:
            fl.states()
            time.sleep(0.01)
    wait_for(fl, "aggregator", RUNNING)
    assert fl.restarts() == {"aggregator": 6}
    # Negative control: the same kills, each before the start time, are a crash loop.
    fl.shutdown()
    slow_start = RestartPolicy(startsecs=1.0, startretries=3, base=0.02, cap=0.05)
    fl2 = launcher(tmp_path / "quick", {"aggregator": ["sleep"]}, policy=slow_start)
    fl2.start()
    for _ in range(slow_start.startretries + 1):
        wait_for(fl2, "aggregator", RUNNING)
        pid = fl2.procs["aggregator"].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        while fl2.procs["aggregator"].pid == pid:
            fl2.states()
            time.sleep(0.01)
    assert fl2.states()["aggregator"] == FATAL
    fl2.shutdown()


def test_stop_is_graceful_and_kills_after_the_grace_period(tmp_path: Path) -> None:
    fl = launcher(
        tmp_path,
        {"aggregator": ["graceful"], "worker:worker-0": ["ignore-term"]},
        grace=1.0,
    )
    fl.start()
    time.sleep(0.3)  # let the children install their handlers
    assert set(fl.states().values()) == {RUNNING}
    pids = [p.pid for p in fl.procs.values()]
    # Forked children share the parent's command line; the run folder says which pid is which.
    assert json.loads((tmp_path / "pids.json").read_text()) == {
        "aggregator": pids[0],
        "worker:worker-0": pids[1],
    }
    t0 = time.monotonic()
    fl.stop_workers()
    assert 0.9 < time.monotonic() - t0 < 5  # waited for the grace period, then SIGKILL
    assert fl.states() == {"aggregator": RUNNING, "worker:worker-0": STOPPED}
    fl.stop_aggregator()
    assert fl.states()["aggregator"] == STOPPED
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_children_die_with_their_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from dssgd.launcher import ForkLauncher
        from tests.integration.test_launcher import entry
        fl = ForkLauncher(Path({str(tmp_path)!r}), {{"worker:worker-0": ["sleep"]}},
                          entry=entry, warm_up=lambda: None)
        fl.start()
        print(fl.procs["worker:worker-0"].pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.kill()  # SIGKILL: the parent cannot clean up
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the child outlived its parent")


def test_service_command_lines() -> None:
    conns = Connections(amqp_url="amqp://a/%2F", redis_url="redis://r:1/0")
    progs = service_argv("r1", 2, conns)
    assert list(progs) == ["aggregator", "worker:worker-0", "worker:worker-1"]
    assert progs["worker:worker-1"][:5] == ["worker", "--run-id", "r1", "--slot", "1/2"]
    assert "amqp://a/%2F" in progs["aggregator"] and "redis://r:1/0" in progs["aggregator"]


@pytest.mark.parametrize("code", [2, 77])
def test_permanent_exits_are_fatal_at_once(tmp_path: Path, code: int) -> None:
    # Bad input (2) and a refused password or right (77) come back on every restart: no loop.
    fl = launcher(tmp_path, {"worker:worker-0": ["exit", str(code)]})
    fl.start()
    wait_for(fl, "worker:worker-0", FATAL, timeout=3)
    assert (tmp_path / "logs" / "worker-0.log").read_text().count("child exit") == 1


def test_workers_keep_their_identity_across_restarts() -> None:
    progs = service_argv("r1", 2, Connections(amqp_url="amqp://a/%2F", redis_url="redis://r:1/0"))
    argv = progs["worker:worker-1"]
    assert argv[argv.index("--worker-id") + 1] == "r1-worker-1"


def test_the_supervisord_config_has_the_same_restart_policy(tmp_path: Path) -> None:
    """supervisor runs the policy itself; what it is told is what the fork launcher does."""
    import configparser

    from dssgd.supervisor import render_config

    text = render_config(tmp_path, "r1", 2, Connections())
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(text)
    policy = RestartPolicy()
    for section, ok in (("program:aggregator", "0,2,75,77"), ("program:worker", "0,2,77")):
        assert conf[section]["autorestart"] == "unexpected"
        assert float(conf[section]["startsecs"]) == policy.startsecs
        assert int(conf[section]["startretries"]) == policy.startretries
        # 2 and 77 are "expected" to supervisor (never restarted); `states` reports them FATAL.
        assert conf[section]["exitcodes"] == ok
