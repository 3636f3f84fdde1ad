"""Fail points: a process kills itself with SIGKILL at a named point, for crash tests.

``DSSGD_FAILPOINT=NAME`` (or ``NAME:K``, the K-th time the point is reached) in the environment
arms one point; unset, ``hit`` is one dictionary lookup. The crash tests use it to put a real
kill -9 exactly where timing alone would land it once in a thousand runs (for example between
two range shards' commits, tests/integration/test_shards.py); the pattern is etcd's gofail.
"""

from __future__ import annotations

import os
import signal

_ARMED = os.environ.get("DSSGD_FAILPOINT", "")
_NAME, _, _AT = _ARMED.partition(":")
_count = 0


def hit(name: str) -> None:
    """SIGKILL this process if ``name`` is the armed point (and this is its K-th hit)."""
    global _count
    if name != _NAME:
        return
    _count += 1
    if _count >= int(_AT or 1):
        os.kill(os.getpid(), signal.SIGKILL)
