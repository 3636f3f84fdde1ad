"""Which entries of Δw a participant shares, and how they are bounded (pure functions).

These are the paper's steps 4 and 5: select at most θu·n entries of Δw, either the largest in
magnitude or random ones among those above a threshold τ, then clip every shared value to [−γ, γ].

Selection rules are a small interface with a registry: ``SELECTION_RULES`` holds the built-in
ones, and ``--selection pkg.mod:Name`` (or ``FILE.py:Name``) names any object with a
``select(delta, k, tau, rng) -> indices`` method (a class is instantiated), so a new rule needs
no edit of the participant, the aggregator or the configuration.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import numpy as np
from dssgd.shared import plugins


def budget(n: int, theta_u: float) -> int:
    """How many entries θu allows for a model of n parameters (at least one, at most n)."""
    if not 0.0 < theta_u <= 1.0:
        raise ValueError(f"theta_u must be in (0, 1], got {theta_u}")
    return max(1, min(n, math.ceil(theta_u * n - 1e-9)))


def sorted_distinct(entries: np.ndarray, n: int) -> np.ndarray:
    """The sorted distinct entries: a mask over n when there are many (np.unique sorts at
    ~0.3 µs an entry, a mask costs ~1.5 ns per parameter: for one MLP update at θu 0.1,
    3.1 ms against 0.15 ms), a sort when there are few beside n (a 10 M model at θu 0.01)."""
    if entries.size * 64 < n:
        return np.unique(entries)
    mask = np.zeros(n, bool)
    mask[entries] = True
    return np.flatnonzero(mask)


def select_top_k(delta: np.ndarray, k: int) -> np.ndarray:
    """Indices (sorted) of the k entries of largest |Δw| (deterministic for equal input)."""
    n = delta.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    mag = np.abs(delta)
    # argpartition is O(n); stable tie-breaking is not needed for correctness, only determinism.
    idx = np.argpartition(mag, n - k)[n - k :]
    return sorted_distinct(idx.astype(np.int64), n)


def select_threshold_random(
    delta: np.ndarray, k: int, tau: float, rng: np.random.Generator
) -> np.ndarray:
    """Up to k indices (sorted) drawn uniformly among the entries with |Δw| > τ."""
    above = np.flatnonzero(np.abs(delta) > tau)
    if above.size <= k:
        return above.astype(np.int64)
    return np.sort(rng.choice(above, size=k, replace=False).astype(np.int64))


class SelectionRule(Protocol):
    """At most k indices of Δw to share; ``help`` is the line ``--help`` shows."""

    help: str

    def select(
        self, delta: np.ndarray, k: int, tau: float, rng: np.random.Generator
    ) -> np.ndarray: ...


class TopK:
    help = "the k largest |Δw|"

    def select(self, delta: np.ndarray, k: int, tau: float, rng: np.random.Generator) -> np.ndarray:
        return select_top_k(delta, k)


class ThresholdRandom:
    help = "k at random among |Δw| > τ"

    def select(self, delta: np.ndarray, k: int, tau: float, rng: np.random.Generator) -> np.ndarray:
        return select_threshold_random(delta, k, tau, rng)


SELECTION_RULES: dict[str, SelectionRule] = {"topk": TopK(), "threshold": ThresholdRandom()}


def selection_help() -> str:
    rules = "; ".join(f"{name}: {rule.help}" for name, rule in SELECTION_RULES.items())
    return f"which entries of Δw are shared — {rules}; or pkg.mod:Name"


@functools.lru_cache(maxsize=16)
def selection_rule(name: str) -> SelectionRule:
    """A registered rule by name, or a user's by ``pkg.mod:Name`` / ``FILE.py:Name``."""
    return plugins.registered_or_loaded(  # type: ignore[no-any-return]
        name,
        SELECTION_RULES,
        "selection rule",
        "select(delta, k, tau, rng)",
        f"choose {', '.join(SELECTION_RULES)}",
    )


def select(
    delta: np.ndarray,
    theta_u: float,
    rule: str = "topk",
    tau: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    k = budget(delta.size, theta_u)
    chosen = selection_rule(rule).select(delta, k, tau, rng or np.random.default_rng())
    if rule in SELECTION_RULES:
        return chosen
    # A user's rule: hold it to the contract the wire and the aggregator rely on.
    out = np.unique(np.asarray(chosen, dtype=np.int64))
    if out.size > k or (out.size and (out[0] < 0 or out[-1] >= delta.size)):
        raise plugins.PluginError(f"selection rule {rule} returned more than {k} or bad indices")
    return out


def clip(values: np.ndarray, gamma: float) -> np.ndarray:
    """Bound every value to [−γ, γ] (float32 in, float32 out)."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return np.clip(values, -gamma, gamma).astype(np.float32, copy=False)


def select_state(
    delta: np.ndarray,
    n_params: int,
    theta_u: float,
    gamma: float,
    rule: str = "topk",
    tau: float = 0.0,
    rng: np.random.Generator | None = None,
    send_buffers: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of one update over the whole flat state (shared/models.py layout).

    The parameters ``delta[:n_params]`` are selected (θu of them) and clipped to ±γ. The buffers
    after them (BatchNorm running statistics and counters) are not gradients: their change after
    an epoch can be far larger than γ, and clipping or ranking them against the parameters
    loses them (measured in docs/TASKS.md), so they travel whole, with a budget of their own.
    """
    indices = select(delta[:n_params], theta_u, rule, tau, rng)
    values = clip(delta[indices], gamma)
    if not send_buffers or n_params == delta.size:
        return indices, values
    buffers = np.arange(n_params, delta.size, dtype=np.int64)
    return (
        np.concatenate([indices, buffers]),
        np.concatenate([values, delta[n_params:].astype(np.float32)]),
    )


def entry_limit(n: int, n_buffers: int, theta_u: float) -> int:
    """Most entries one update may carry: θu of the parameters, plus every buffer entry."""
    return budget(n - n_buffers, theta_u) + n_buffers


def most_updated(stat: np.ndarray, theta_d: float) -> np.ndarray:
    """Indices (sorted) of the θd fraction of parameters with the largest update counters."""
    n = stat.size
    if theta_d >= 1.0:
        return np.arange(n, dtype=np.int64)
    k = max(1, math.ceil(theta_d * n - 1e-9))
    return np.sort(np.argpartition(stat, n - k)[n - k :].astype(np.int64))
