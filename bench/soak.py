"""The soak: one run for 30 minutes with periodic faults, then the exact-sum oracle and memory.

    nice python -m bench.soak                    # 30 minutes, a fault every 60 s
    python -m bench.soak --minutes 3 --fault-every 20   # a short rehearsal

One run of synthetic participants (small integer updates, so float32 sums are exact; the real
aggregator and worker processes, the real broker and Redis code paths) against a PRIVATE Redis
(AOF, appendfsync always) and a PRIVATE RabbitMQ node with its own Erlang port mapper, both
started here on ports from DSSGD_SOAK_PORTS (default 17439-17499) inside a temporary
directory. The faults cycle through: SIGKILL of the aggregator, SIGKILL of a worker, a broker
restart (graceful, then kill -9 the next time), a Redis restart (kill -9, then SIGTERM). Every
fault must be followed by progress (the global version increases) within 60 s.

At the end: every confirmed update applied exactly once (lost 0, doubled 0), the global
parameters byte for byte the float32 sum of the applied updates, and the resident memory (RSS
from /proc) of every process sampled every few seconds: a table of the first and the last
third of the soak per role, and a plot (--plot, PNG). Exit 0 all good, 1 a check failed, 3 the
private servers could not start, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from bench import chaos
from bench.chaos import PrivateRabbit, Result, Run, Services, SetupError, time_until

ROOT = Path(__file__).resolve().parent.parent
PORTS = os.environ.get("DSSGD_SOAK_PORTS", "17439-17499")
FAULTS = ("aggregator", "worker", "rabbitmq", "redis")


class SoakRabbit(PrivateRabbit):
    """The chaos bench's private node, plus its own epmd and CLI ports and one scheduler."""

    def __init__(self, base: Path, epmd_port: int, ctl_ports: tuple[int, int]) -> None:
        super().__init__(base)
        self.node = f"dssgd-soak-{os.getpid()}@localhost"
        self.epmd_port = epmd_port
        self.ctl_ports = ctl_ports

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["ERL_EPMD_PORT"] = str(self.epmd_port)
        env["RABBITMQ_CTL_DIST_PORT_MIN"] = str(self.ctl_ports[0])
        env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(self.ctl_ports[1])
        # One scheduler: the machine is shared by others, and a soak measures memory, not speed.
        env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = (
            "+S 1:1 -kernel inet_dist_use_interface {127,0,0,1}")
        return env

    def start(self, timeout: float = 600.0) -> None:
        # On a loaded shared machine a boot can take minutes; the soak must not end over it.
        super().start(timeout=timeout)

    def _own_pids(self) -> list[int]:
        """By the private epmd port in the node's environment (RabbitMQ's scripts do not keep
        RABBITMQ_NODENAME there on every version); no other node uses that port."""
        needle = f"ERL_EPMD_PORT={self.epmd_port}".encode()
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if b"beam" not in (entry / "cmdline").read_bytes().split(b"\0", 1)[0]:
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in environ and chaos.pid_alive(int(entry.name)):
                out.append(int(entry.name))
        return out

    def stop_epmd(self) -> None:
        """Our private epmd outlives the node; stop it by its pid (found by its port)."""
        needle = f"ERL_EPMD_PORT={self.epmd_port}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if b"epmd" not in (entry / "cmdline").read_bytes().split(b"\0", 1)[0]:
                    continue
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGTERM)
            except OSError:
                continue


class SoakServices(Services):
    def __init__(self, base: Path, epmd_port: int, ctl_ports: tuple[int, int]) -> None:
        super().__init__(base)
        self.epmd_port = epmd_port
        self.ctl_ports = ctl_ports
        self.soak_rabbit: SoakRabbit | None = None

    def start(self) -> None:
        self.redis.start()
        self.soak_rabbit = SoakRabbit(self.base, self.epmd_port, self.ctl_ports)
        self.rabbit = self.soak_rabbit
        self.rabbit.start()  # no fallback to the shared broker: the soak restarts it

    def close(self) -> None:
        super().close()
        if self.soak_rabbit is not None:
            self.soak_rabbit.stop_epmd()


# --- memory -------------------------------------------------------------------------------------


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


class Sampler(threading.Thread):
    """Every `interval` s: (t, role, pid, RSS MB) of every process of the soak."""

    def __init__(self, svc: SoakServices, run: Run, interval: float) -> None:
        super().__init__(daemon=True)
        self.svc, self.run_, self.interval = svc, run, interval
        self.t0 = time.monotonic()
        self.samples: list[tuple[float, str, int, float]] = []
        self.stopped = threading.Event()

    def pids(self) -> dict[str, int | None]:
        run, svc = self.run_, self.svc
        out: dict[str, int | None] = {"soak bench": os.getpid()}
        agg = run.aggregator
        out["aggregator"] = agg.pid if agg is not None and agg.poll() is None else None
        for group, p in list(run.workers.items()):
            out["worker " + ",".join(map(str, group))] = p.pid if p.poll() is None else None
        proc = svc.redis.proc
        out["redis-server"] = proc.pid if proc is not None else None
        out["rabbitmq (beam)"] = svc.rabbit.pid if svc.rabbit is not None else None
        return out

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            t = time.monotonic() - self.t0
            for role, pid in self.pids().items():
                mb = rss_mb(pid)
                if pid is not None and mb is not None:
                    self.samples.append((t, role, pid, mb))


def memory_table(samples: list[tuple[float, str, int, float]], seconds: float) -> str:
    """Median and max RSS per role in the first and the last third (after 60 s of warm-up)."""
    third = (seconds - 60) / 3
    head = (f"{'process':<18} {'first third MB (median/max)':>28} "
            f"{'last third MB (median/max)':>27} {'pids':>5}")
    lines = [head, "-" * len(head)]
    for role in sorted({r for _, r, _, _ in samples}):
        rows = [(t, pid, mb) for t, r, pid, mb in samples if r == role]
        first = [mb for t, _, mb in rows if 60 <= t < 60 + third]
        last = [mb for t, _, mb in rows if t >= seconds - third]
        if not first or not last:
            continue
        lines.append(f"{role:<18} {statistics.median(first):>15.1f} / {max(first):>8.1f}   "
                     f"{statistics.median(last):>14.1f} / {max(last):>8.1f}   "
                     f"{len({pid for _, pid, _ in rows}):>5}")
    return "\n".join(lines)


def plot(samples: list[tuple[float, str, int, float]], faults: list[tuple[float, str]],
         out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for role in sorted({r for _, r, _, _ in samples}):
        # One line per incarnation (pid): a restart starts a new line, not a drop in one.
        for pid in sorted({p for _, r, p, _ in samples if r == role}):
            pts = [(t / 60, mb) for t, r, p, mb in samples if r == role and p == pid]
            first = pid == min(p for _, r, p, _ in samples if r == role)
            ax.plot(*zip(*pts, strict=True), lw=1, color=_colour(role),
                    label=role if first else None)
    for t, _what in faults:
        ax.axvline(t / 60, color="grey", lw=0.4, alpha=0.5)
    ax.set_xlabel("minutes (grey lines: faults)")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, ncols=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


_COLOURS: dict[str, str] = {}


def _colour(role: str) -> str:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
               "tab:pink", "tab:olive"]
    return _COLOURS.setdefault(role, palette[len(_COLOURS) % len(palette)])


# --- the faults ------------------------------------------------------------------------------


def inject(kind: str, n: int, svc: SoakServices, run: Run, rng: random.Random,
           res: Result) -> str:
    """One fault; returns what was done. Raises SetupError if a server cannot come back."""
    if kind == "aggregator":
        run.kill_aggregator()
        run.start_aggregator()
        what = "aggregator SIGKILL"
    elif kind == "worker":
        group = run.groups[n % len(run.groups)]
        torn = run.kill_worker(group)
        run.start_worker(group)
        what = f"worker {group} SIGKILL" + (f" ({torn} torn lines cut)" if torn else "")
    elif kind == "rabbitmq":
        assert svc.rabbit is not None
        how = "stop" if n % 2 == 0 else "kill9"
        svc.rabbit.halt(how)
        svc.rabbit.start()
        what = f"RabbitMQ {how} + start"
    else:
        how = "kill9" if n % 2 == 0 else "term"
        svc.redis.stop(signal.SIGKILL if how == "kill9" else signal.SIGTERM)
        svc.redis.start()
        what = f"Redis {how} + start"
    res.faults += 1
    return what


def supervise(run: Run, res: Result, t0: float) -> None:
    """What supervisor would do: restart a service that exited by itself (a worker or an
    aggregator started while a server was down exits 69 instead of waiting for it)."""
    for group, p in list(run.workers.items()):
        if p.poll() is not None:
            torn = run.kill_worker(group)
            run.start_worker(group)
            res.notes.append(f"{(time.monotonic() - t0) / 60:.1f} min: worker {group} had exited "
                             f"with {p.returncode}; restarted ({torn} torn lines cut)")
    if run.aggregator is not None and run.aggregator.poll() is not None:
        rc = run.aggregator.returncode
        run.start_aggregator()
        res.notes.append(f"{(time.monotonic() - t0) / 60:.1f} min: aggregator had exited with "
                         f"{rc}; restarted")


def sleep_supervised(seconds: float, run: Run, res: Result, t0: float) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        supervise(run, res, t0)


def soak(svc: SoakServices, args: argparse.Namespace, rng: random.Random) -> tuple[
        Result, Sampler, list[tuple[float, str]], float]:  # long: one scenario, start to verify
    res = Result("soak")
    faults: list[tuple[float, str]] = []
    with svc.run("soak", pace=args.pace, participants=args.participants,
                 theta_u=args.theta_u) as run:
        run.start_aggregator()
        run.start_workers()
        run.await_progress()
        sampler = Sampler(svc, run, args.sample)
        sampler.start()
        t0 = sampler.t0
        end = t0 + args.minutes * 60
        counts = dict.fromkeys(FAULTS, 0)
        i = 0
        while True:
            wait = args.fault_every * rng.uniform(0.75, 1.25)
            if time.monotonic() + wait > end - 30:  # leave the last 30 s undisturbed
                break
            sleep_supervised(wait, run, res, t0)
            kind = FAULTS[i % len(FAULTS)]
            what = inject(kind, counts[kind], svc, run, rng, res)
            counts[kind] += 1
            i += 1
            t_end = time.monotonic()
            faults.append((t_end - t0, what))
            v0 = run.version()
            took = time_until(lambda v0=v0: run.version() > v0, t_end)
            res.recovered(took, what)
            shown = "never" if took is None else f"{took:.2f} s"
            print(f"[soak] {(t_end - t0) / 60:5.1f} min  {what}; progress again after {shown}; "
                  f"version {run.version()}", flush=True)
        sleep_supervised(max(0.0, end - time.monotonic()), run, res, t0)
        seconds = time.monotonic() - t0
        sampler.stopped.set()
        sampler.join()
        print(f"[soak] {seconds / 60:.1f} min over; draining and checking the oracle", flush=True)
        run.finish(res)
        res.notes.append("faults: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return res, sampler, faults, seconds


class Interrupted(BaseException):
    pass


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _ports() -> tuple[int, tuple[int, int]]:
    lo, hi = (int(x) for x in PORTS.split("-"))
    if hi - lo < 15:
        raise SystemExit("DSSGD_SOAK_PORTS needs at least 16 ports")
    # epmd on the first, rabbitmqctl's distribution ports on the last ten, servers in between.
    chaos.PORT_RANGE = f"{lo + 1}-{hi - 10}"
    return lo, (hi - 9, hi)


def main(argv: list[str] | None = None) -> int:  # long: set-up, report and clean-up in order
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--fault-every", type=float, default=60.0, help="mean seconds between faults")
    ap.add_argument("--participants", type=int, default=4)
    ap.add_argument("--pace", type=float, default=0.5, help="seconds between two epochs")
    ap.add_argument("--theta-u", type=float, default=0.003)
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/img/soak-memory.png")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, records)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    epmd, ctl = _ports()
    with contextlib.suppress(OSError):
        chaos._LIBC = ctypes.CDLL(None, use_errno=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    base = Path(tempfile.mkdtemp(prefix="dssgd-soak-"))
    svc: SoakServices | None = None
    started = datetime.now(UTC)
    try:
        svc = SoakServices(base, epmd, ctl)
        svc.start()
        assert svc.rabbit is not None
        print(f"[soak] python -m bench.soak {' '.join(argv or sys.argv[1:])}".rstrip())
        print(f"[soak] {started:%Y-%m-%d %H:%M:%S} UTC, {platform.node()}, {os.cpu_count()} "
              f"cores (shared), seed {seed}; private Redis {svc.redis.version} on "
              f"{svc.redis.port}, RabbitMQ {svc.rabbit.version} node {svc.rabbit.node} on "
              f"{svc.rabbit.port} (epmd {epmd}); work dir {base}", flush=True)
        res, sampler, faults, seconds = soak(svc, args, rng)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"[soak] interrupted ({exc})", file=sys.stderr)
        return 130
    except SetupError as exc:
        print(f"[soak] cannot run: {exc}", file=sys.stderr)
        return 3
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if svc is not None:
            svc.close()
        if args.keep:
            print(f"[soak] kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(chaos.table([res]))
    print()
    print(memory_table(sampler.samples, seconds))
    title = (f"dssgd soak: {seconds / 60:.0f} min, {res.faults} faults, {res.applied} updates "
             f"applied, lost {res.lost}, doubled {res.duplicated}")
    plot(sampler.samples, faults, args.plot, title)
    print(f"\n[soak] memory plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({
            "started": started.isoformat(), "seconds": seconds, "faults": faults,
            "confirmed": res.confirmed, "applied": res.applied, "lost": res.lost,
            "duplicated": res.duplicated, "w_exact": res.w_exact,
            "recoveries": res.recoveries, "problems": res.problems, "notes": res.notes,
            "samples": sampler.samples}))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
