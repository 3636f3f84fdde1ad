"""Server-side checks of a decoded update against the run (pure; raises ValidationError).

The wire module already guarantees a well-formed message for this run and model size (sorted
unique indices < n, finite float32 values, lengths equal; ``decode(expected_run, expected_n)``).
Here we check what only the run knows, whatever the participant claims: who may send, how many
entries, how large (``validate``), and how stale (``check_version``, at apply time).
"""

from __future__ import annotations

import numpy as np
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import ValidationError
from dssgd.shared.selection import entry_limit
from dssgd.shared.tasks import buffer_entries
from dssgd.shared.wire import Update

# float32 rounding of a value clipped to γ in float64 may land one ulp above γ (6e-8 relative),
# and q8's product q·scale a few ulps (measured worst 1.8e-7). f16 would need 2**-11, so its
# encoder steps values toward zero instead (wire.encode(bound=γ)) and this bound stays tight.
GAMMA_TOLERANCE = 1e-6


def validate(update: Update, cfg: RunConfig, n: int) -> None:
    """Check what an update claims against the run; the version is checked at apply time."""
    if not 0 <= update.participant < cfg.participants:
        raise ValidationError(
            "unknown-participant",
            f"participant {update.participant} not in 0..{cfg.participants - 1}",
        )
    # Buffers (after the parameters) travel whole and unclipped: shared/selection.select_state.
    buffers = buffer_entries(cfg.task) if cfg.buffers == "whole" else 0
    limit = entry_limit(n, buffers, cfg.theta_u)
    if update.count > limit:
        raise ValidationError("too-many-entries", f"{update.count} entries, θu allows {limit}")
    values = update.values[update.indices < n - buffers] if buffers else update.values
    if values.size:
        if update.peak is None or buffers:  # not from wire.decode, which refuses non-finite values
            if not np.isfinite(values).all():
                raise ValidationError("non-finite", "values must be finite")
            peak = float(np.abs(values).max())
        else:
            peak = update.peak
        gamma = cfg.effective_gamma
        if peak > gamma * (1 + GAMMA_TOLERANCE):
            raise ValidationError("beyond-gamma", f"|value| {peak:.3g} exceeds γ = {gamma:.3g}")


def check_version(update: Update, cfg: RunConfig, version: int, shard: int = 0) -> int:
    """The update's staleness at ``version`` of range shard ``shard`` (its base for that shard
    against the shard's own version); refuses a future or too stale base."""
    base = update.base_of(shard)
    if base > version:
        where = f" of shard {shard}" if shard else ""
        raise ValidationError(
            "future-base", f"base version {base} is ahead of global {version}{where}"
        )
    staleness = version - base
    if cfg.max_staleness is not None and staleness > cfg.max_staleness:
        raise ValidationError("stale", f"staleness {staleness} exceeds {cfg.max_staleness}")
    return staleness
