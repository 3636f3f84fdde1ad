"""Your own training loop, in the spirit of NVIDIA FLARE's Client API: pull, train your way, push.

    client = Client("r1", participant=3, model=my_module)
    for _ in range(epochs):
        client.pull(my_module)          # the global state (θd of it) into the module
        my_training_loop(my_module)     # any optimizer, schedulers, mixed precision…
        client.push(my_module, loss)    # Δw → select θu → clip ±γ → encode → publish, once
    client.close()

dssgd still does everything that makes an update safe to apply: the module's layout is checked
against the run's model record, Δw is taken against exactly the state that was pulled, selection,
clipping, buffers, encoding and the HMAC tag are the run's, and the sequence number is burnt
before the publish and advanced only on the broker's confirm, so one push is applied exactly once.
"""

from __future__ import annotations

import math
import time

from torch import nn

from shared.amqp_names import AmqpNames
from shared.broker import Publisher
from shared.config import Connections
from shared.errors import ConfigError
from shared.lifecycle import StopFlag
from shared.models import layout_of, set_flat
from shared.store import RunStore
from shared.store import connect as redis_connect
from shared.tasks import check_layout
from worker.participant import EpochReport, Participant


class Client:
    def __init__(
        self,
        run_id: str,
        participant: int,
        model: nn.Module,
        connections: Connections | None = None,
        hmac_key: bytes | None = None,
        stop: StopFlag | None = None,
    ) -> None:
        conns = connections or Connections.from_env()
        self.stop = stop or StopFlag()
        self.store = RunStore(redis_connect(conns.redis_url), run_id)
        cfg = self.store.wait_config(self.stop)
        record = self.store.model_record()
        if record is None:
            raise ConfigError(f"run {run_id!r} has no model record yet: start its aggregator")
        check_layout(layout_of(model), record, run_id, f"participant {participant}'s module")
        if not 0 <= participant < cfg.participants:
            raise ConfigError(f"participant {participant} is outside 0..{cfg.participants - 1}")
        self.publisher = Publisher(conns.amqp_url, AmqpNames(run_id), app_id=str(participant))
        self.part = Participant(
            participant, cfg, self.store, self.publisher, self.stop, None, hmac_key=hmac_key,
            model=model,
        )  # fmt: skip
        self._pulled: tuple[int, object, int, float] | None = None

    def pull(self, model: nn.Module) -> int:
        """Load the global state into ``model``; returns the global version it came from."""
        if model is not self.part.model:
            raise ConfigError("pull() and push() take the module the Client was made with")
        t0 = time.perf_counter()
        version, base, bytes_down = self.part.download()
        set_flat(model, base)
        self._pulled = (version, base, bytes_down, t0)
        return version

    def push(self, model: nn.Module, loss: float = math.nan) -> EpochReport:
        """Share what training changed since the last pull: published and confirmed, once."""
        if self._pulled is None:
            raise ConfigError("push() needs a pull() first: Δw is taken against the pulled state")
        if model is not self.part.model:
            raise ConfigError("pull() and push() take the module the Client was made with")
        version, base, bytes_down, t0 = self._pulled
        self._pulled = None  # one push per pull: a second push cannot resend the same change
        t1 = time.perf_counter()
        indices, values = self.part.select(base)  # type: ignore[arg-type]
        return self.part.publish(
            version, indices, values, loss, bytes_down, t0, time.perf_counter() - t1
        )

    def close(self, finished: bool = True) -> None:
        self.store.leave(self.part.pid, finished=finished)
        self.part.close()
        self.publisher.close()
