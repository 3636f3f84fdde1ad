"""Process lifecycle: stop flag, signals, retry policy, exit codes, logging set-up."""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

# Exit codes that mean something to supervisor, compose and scripts.
EXIT_OK = 0  # finished or stopped gracefully
EXIT_ERROR = 1  # unexpected failure
EXIT_USAGE = 2  # bad option, config or input: a user mistake, message printed
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a service could not be reached in time
EXIT_FENCED = 75  # EX_TEMPFAIL: another aggregator took over the run
EXIT_IMMEDIATE = 130  # second signal: stopped at once

log = logging.getLogger(__name__)


class StopFlag:
    """Set by the first SIGTERM/SIGINT; loops check it at least once a second."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    __bool__ = is_set


def install_signal_handlers(flag: StopFlag) -> None:
    """First SIGTERM/SIGINT: finish the current unit of work and exit 0. Second: exit at once."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if flag.is_set():
            log.warning("second %s: stopping immediately", name)
            logging.shutdown()
            os._exit(EXIT_IMMEDIATE)
        log.info("%s received: finishing the current work, then stopping", name)
        flag.set(f"{name} received")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter (the retry policy is an object, not a loop)."""

    initial: float = 0.1
    cap: float = 5.0
    factor: float = 2.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * self.factor ** min(self.attempt, 64))
        # The exponent is capped: after hours of retries factor**attempt would overflow a float.
        self.attempt = min(self.attempt + 1, 64)
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0

    def sleep(self, stop: StopFlag | None = None) -> bool:
        """Sleep the next delay; returns False (early) if the stop flag was set meanwhile."""
        delay = self.next_delay()
        if stop is None:
            time.sleep(delay)
            return True
        return not stop.wait(delay)


def setup_logging(level: str | None = None, name: str = "") -> None:
    level = (level or os.environ.get("DSSGD_LOG_LEVEL", "INFO")).upper()
    fmt = f"%(asctime)s %(levelname)s {name + ' ' if name else ''}%(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("pika").setLevel(logging.WARNING)
