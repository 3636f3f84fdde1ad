"""The project's own error tree.

Library errors (pika, redis, msgpack) are converted into these types where they happen, so the
long-running loops catch ours and never a third party's.
"""

from __future__ import annotations


class DssgdError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(DssgdError):
    """A setting or option is invalid; the message says which and why (a user mistake)."""


class DataError(DssgdError):
    """The training data could not be found or read."""


class WireError(DssgdError):
    """A message body could not be decoded or is not a valid message (never anything else)."""


class AuthenticationError(WireError):
    """A message fails authentication: unknown sender, no tag, or a tag that does not verify."""


class ValidationError(DssgdError):
    """A decoded update is well-formed but not acceptable for this run (reason in the message)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BrokerError(DssgdError):
    """RabbitMQ could not be reached or refused an operation."""


class UnroutableError(BrokerError):
    """A publish matched no queue (mandatory=True returned it)."""


class StoreError(DssgdError):
    """Redis could not be reached or refused an operation."""


class FencedError(StoreError):
    """Another aggregator took over the run; this one must stop writing."""


class StopRequested(DssgdError):
    """A stop signal arrived while waiting; unwind and exit cleanly."""


# Words in a Redis or RabbitMQ refusal that retrying cannot change: a password or a right.
PERMANENT_MARKERS = (
    "NOPERM",
    "no permissions",
    "WRONGPASS",
    "NOAUTH",
    "invalid username",
    "ACCESS_REFUSED",
)


def is_permanent(exc: BaseException) -> bool:
    """True for authentication and authorization refusals: end the service, do not loop."""
    return any(word in str(exc) for word in PERMANENT_MARKERS)
