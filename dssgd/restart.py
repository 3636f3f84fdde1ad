"""The restart policy both launchers of `dssgd run` follow, and the states they report.

Kept apart so that the fork launcher (`dssgd/launcher.py`) and the supervisord configuration
(`dssgd/supervisor.py`) read one definition without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

# States use supervisor's words so `dssgd run` reads both launchers alike.
RUNNING, EXITED, BACKOFF, FATAL, STOPPED = "RUNNING", "EXITED", "BACKOFF", "FATAL", "STOPPED"

# 2 (bad input) and 77 (a password or right refused) come back on every restart.
PERMANENT_EXIT_CODES = frozenset({2, 77})


@dataclass(frozen=True)
class RestartPolicy:
    """supervisor's `autorestart=unexpected` with its `startsecs`/`startretries`, plus a backoff.

    Any unexpected exit is restarted, after `base` · 2^(k−1) seconds (capped at `cap`), k being
    the service's unexpected exits within the last `window` seconds: a service killed once an
    hour restarts after `base`, one killed every few seconds after at most `cap`. A service is
    FATAL only when it could not stay up for `startsecs` more than `startretries` times in a row
    (a crash loop at start), or when it exits with a permanent code (2: bad input, 77: a
    password or right refused), which would come back on every restart.
    """

    startsecs: float = 1.0
    startretries: int = 3
    base: float = 0.5
    cap: float = 5.0
    window: float = 60.0

    def delay(self, recent_exits: int) -> float:
        return min(self.cap, self.base * 2 ** max(0, recent_exits - 1))
