"""Periodic evaluation of the global model on the MNIST test set, off the apply path.

A daemon thread takes a snapshot of the last commit (parameters, version and totals together,
copied under the aggregator's lock: a memcpy of a few hundred KB) and evaluates the copy, so
applying updates never waits for PyTorch. Each point of the time series (time, version, updates
applied, bytes received, accuracy, loss) is pushed to Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from aggregator.metrics import AggregatorMetrics
from shared.config import RunConfig
from shared.data import load_mnist, prepare
from shared.errors import DssgdError
from shared.models import build_model, set_flat
from shared.store import RunStore
from shared.training import evaluate, labels_tensor

if TYPE_CHECKING:
    from aggregator.service import Snapshot

log = logging.getLogger(__name__)


def build_evaluation(cfg: RunConfig) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model and the test set the global parameters are scored on (one place to swap)."""
    data = load_mnist(cfg.data)
    return build_model(cfg.model), prepare(data.test_x, cfg.model), labels_tensor(data.test_y)


class Evaluator:
    """Scores the committed parameters every few seconds; sees only ``snapshot()``."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        store: RunStore,
        cfg: RunConfig,
        metrics: AggregatorMetrics,
    ) -> None:
        self.snapshot, self.store, self.cfg, self.metrics = snapshot, store, cfg, metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        torch.set_num_threads(1)  # the aggregator shares the machine with the participants
        try:
            model, x, y = build_evaluation(self.cfg)
        except DssgdError as exc:
            log.error("evaluation disabled: %s", exc)
            return
        last_version = -1
        start = time.time()
        pause = self.cfg.eval_interval
        while not self._stop.wait(pause):
            snap = self.snapshot()
            if snap is None or snap.version == last_version:
                continue
            set_flat(model, snap.w)
            t_eval = time.perf_counter()
            with torch.inference_mode():
                result = evaluate(model, x, y)
            # Evaluation shares the cores with training: keep it under ~20% of one core (a CNN
            # pass over 10k test images takes seconds) whatever the configured interval.
            pause = max(self.cfg.eval_interval, 4 * (time.perf_counter() - t_eval))
            last_version = snap.version
            point = {
                "time": time.time(),
                "elapsed": time.time() - start,
                "version": snap.version,
                "applied": snap.applied,
                "bytes_in": snap.bytes_in,
                "accuracy": result.accuracy,
                "loss": result.loss,
            }
            self.metrics.set_accuracy(result.accuracy, result.loss)
            try:
                self.store.push_metric(point)
            except DssgdError as exc:
                log.warning("could not record a metric: %s", exc)
            log.info(
                "version %d: test accuracy %.4f, loss %.4f",
                snap.version,
                result.accuracy,
                result.loss,
            )
