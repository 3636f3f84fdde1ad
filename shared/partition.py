"""Seeded partitioners: which examples of a dataset one participant holds, in simulation.

Every function is pure and deterministic in its arguments, so each process computes its own
part without talking to the others, and parts of different participants are computed alike.
A scheme is named by a short spec (``--partition``):

* ``iid`` — disjoint slices of one seeded permutation while N·size fits in the data, independent
  seeded samples (parts overlap, as in the paper's N = 150) when it does not;
* ``dirichlet:α`` — label skew: class proportions of each part drawn from Dirichlet(α);
  small α, few classes (the classic non-IID benchmark of FedAvg's successors);
* ``classes:k`` — k classes per participant, disjoint examples (McMahan et al.'s "pathological"
  split);
* ``quantity:β`` — quantity skew: IID labels, part sizes drawn from Dirichlet(β) over the
  participants (small β, very unequal sizes), disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "classes", "quantity")


@dataclass(frozen=True)
class Scheme:
    name: str = "iid"
    value: float | None = None  # α, k or β

    def __str__(self) -> str:
        return self.name if self.value is None else f"{self.name}:{self.value:g}"


def parse(spec: str) -> Scheme:
    """``iid``, ``dirichlet:0.5``, ``classes:2``, ``quantity:1`` → a Scheme (ConfigError if bad)."""
    name, _, raw = spec.strip().partition(":")
    if name not in SCHEMES:
        raise ConfigError(f"unknown partition {spec!r}; choose one of {', '.join(SCHEMES)}")
    if name == "iid":
        if raw:
            raise ConfigError("partition iid takes no value")
        return Scheme("iid")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"partition {name} needs a number, as in {name}:2") from None
    if not value > 0 or (name == "classes" and not value.is_integer()):
        raise ConfigError(
            f"partition {name} needs a {'whole ' if name == 'classes' else ''}number > 0, got {raw}"
        )
    return Scheme(name, value)


def _check(participant: int, participants: int, size: int, total: int) -> None:
    if not 0 <= participant < participants:
        raise ConfigError(f"participant {participant} is outside 0..{participants - 1}")
    if not 1 <= size <= total:
        raise ConfigError(f"part size must be within 1..{total}, got {size}")


def iid(total: int, participant: int, participants: int, size: int, seed: int) -> np.ndarray:
    _check(participant, participants, size, total)
    if participants * size <= total:
        perm = np.random.default_rng(seed).permutation(total)
        return np.sort(perm[participant * size : (participant + 1) * size])
    rng = np.random.default_rng([seed, participant])
    return np.sort(rng.choice(total, size=size, replace=False))


def dirichlet(
    labels: np.ndarray, participant: int, participants: int, size: int, seed: int, alpha: float
) -> np.ndarray:
    """Class mix ~ Dirichlet(α), sampled without replacement within the part (parts may overlap)."""
    _check(participant, participants, size, len(labels))
    rng = np.random.default_rng([seed, participant, 1])
    classes = np.unique(labels)
    counts = rng.multinomial(size, rng.dirichlet(np.full(len(classes), alpha)))
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    short = [int(c) for c, k in zip(classes, counts, strict=True) if k > pools[c].size]
    if short:
        raise ConfigError(
            f"label skew {alpha} asks for more examples of class(es) {short} "
            "than the data has; use a larger α or a smaller part"
        )
    picked = [
        rng.choice(pools[c], size=k, replace=False)
        for c, k in zip(classes, counts, strict=True)
        if k > 0
    ]
    return np.sort(np.concatenate(picked))


def k_classes(
    labels: np.ndarray, participant: int, participants: int, size: int, seed: int, k: int
) -> np.ndarray:
    """k classes each; a class's examples are split between the participants that hold it."""
    _check(participant, participants, size, len(labels))
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise ConfigError(f"classes:{k} needs 1..{len(classes)} classes per participant")
    order = np.random.default_rng([seed, 2]).permutation(classes)
    # Participant p holds classes p·k … p·k + k − 1 of a seeded cycle, so classes are shared out
    # as evenly as N·k allows.
    held = {p: {order[(p * k + j) % len(order)] for j in range(k)} for p in range(participants)}
    mine = []
    for c in sorted(held[participant]):
        holders = [p for p in range(participants) if c in held[p]]
        pool = np.random.default_rng([seed, 3, int(c)]).permutation(np.flatnonzero(labels == c))
        mine.append(np.array_split(pool, len(holders))[holders.index(participant)])
    rng = np.random.default_rng([seed, participant, 4])
    per_class = [rng.permutation(m)[: max(1, size // k)] for m in mine]
    return np.sort(np.concatenate(per_class))


def quantity(
    total: int, participant: int, participants: int, size: int, seed: int, beta: float
) -> np.ndarray:
    """Disjoint IID parts whose sizes ~ Dirichlet(β) of N·size (at least one example each)."""
    _check(participant, participants, size, total)
    pooled = min(total, participants * size)
    shares = np.random.default_rng([seed, 5]).dirichlet(np.full(participants, beta))
    sizes = 1 + np.floor(shares * (pooled - participants)).astype(np.int64)
    start = int(sizes[:participant].sum())
    perm = np.random.default_rng(seed).permutation(total)
    return np.sort(perm[start : start + int(sizes[participant])])


def indices(
    scheme: Scheme | str,
    labels: np.ndarray | None,
    total: int,
    participant: int,
    participants: int,
    size: int,
    seed: int,
) -> np.ndarray:
    """One participant's part (sorted indices into the dataset) under a scheme."""
    s = parse(scheme) if isinstance(scheme, str) else scheme
    if s.name == "iid":
        return iid(total, participant, participants, size, seed)
    if s.name == "quantity":
        assert s.value is not None
        return quantity(total, participant, participants, size, seed, s.value)
    if labels is None:
        raise ConfigError(f"partition {s} needs a dataset with class targets")
    assert s.value is not None
    if s.name == "dirichlet":
        return dirichlet(labels, participant, participants, size, seed, s.value)
    return k_classes(labels, participant, participants, size, seed, int(s.value))
