"""Large updates (issue 15): no size limit the user did not set refuses a valid update of a
big model; the limit still bounds what a sender may make the aggregator read."""

from __future__ import annotations

import numpy as np
import pytest
from dssgd.shared import wire


def test_a_dense_update_of_a_big_model_is_encoded_and_decoded() -> None:
    n = 2_500_000  # a dense f32 update of it is ≈ 10 MB, above the 8 MiB floor
    upd = wire.Update("big", 0, 1, 0, n, np.arange(n, dtype=np.int64), np.ones(n, np.float32))
    body = wire.encode(upd)
    assert len(body) > wire.MAX_MESSAGE_BYTES
    got = wire.decode(body, expected_run="big", expected_n=n)
    assert got.count == n and got.values.tobytes() == upd.values.tobytes()
    # Negative controls: without the model's size the old floor applies, and a message larger
    # than any valid update of the run's model is still refused before it is parsed.
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode(body)
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode(body, expected_run="big", expected_n=n // 4)
