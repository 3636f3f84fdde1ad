"""Periodic evaluation of the global model on the task's test set, off the apply path.

A daemon thread takes a snapshot of the last commit (parameters, version and totals together,
copied under the aggregator's lock: a memcpy of a few hundred KB) and evaluates the copy, so
applying updates never waits for PyTorch. Each point of the time series (time, version, updates
applied, bytes received, accuracy, loss) is pushed to Redis.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from dssgd.aggregator.metrics import AggregatorMetrics
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import DssgdError
from dssgd.shared.models import set_flat
from dssgd.shared.store import RunStore
from dssgd.shared.tasks import central_test
from dssgd.shared.training import EvalResult

if TYPE_CHECKING:
    from dssgd.aggregator.service import Snapshot

log = logging.getLogger(__name__)


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
            task, model, test = central_test(self.cfg)
        except DssgdError as exc:
            log.error("evaluation disabled: %s", exc)
            return
        if test is None:
            log.info("task %s has no central test set: participants evaluate", self.cfg.task)
            self._federated()
            return
        last_version = -1
        start = time.time()
        pause = self.cfg.eval_interval
        while not self._stop.wait(pause):
            snap = self.snapshot()
            if snap is None or snap.version == last_version:
                continue
            set_flat(model, snap.w)
            cpu = time.thread_time()
            with torch.inference_mode():
                m = task.metrics(model, test)
            result = EvalResult(m.get("accuracy", math.nan), m.get("loss", math.nan), len(test))
            # Evaluation shares the cores with training: keep it under ~20% of one core (a CNN
            # pass over 10k test images takes seconds) whatever the configured interval. CPU
            # time, not wall: waiting for a core the participants hold costs them nothing.
            pause = max(self.cfg.eval_interval, 4 * (time.thread_time() - cpu))
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

    def _federated(self) -> None:
        """Record the participants' own evaluations (held-out parts) as the run's metrics."""
        start, last = time.time(), None
        while not self._stop.wait(self.cfg.eval_interval):
            try:
                point = federated_point(self.store.all_progress(self.cfg.participants))
            except DssgdError as exc:
                log.warning("could not read the participants' evaluations: %s", exc)
                continue
            if point is None or point["version"] == last:
                continue
            last = point["version"]
            snap = self.snapshot()
            if snap is not None:
                point.update(applied=snap.applied, bytes_in=snap.bytes_in)
            point.update(time=time.time(), elapsed=time.time() - start)
            self.metrics.set_accuracy(point["accuracy"], point["loss"])
            try:
                self.store.push_metric(point)
            except DssgdError as exc:
                log.warning("could not record a metric: %s", exc)


def federated_point(progress: dict[int, dict[str, str]]) -> dict[str, Any] | None:
    """Example-weighted mean of the participants' latest held-out evaluations (pure)."""
    rows = [p for p in progress.values() if "fed_examples" in p and "fed_accuracy" in p]
    if not rows:
        return None
    weights = [int(p["fed_examples"]) for p in rows]
    total = max(1, sum(weights))

    def mean(key: str) -> float:
        return sum(float(p.get(key, "nan")) * w for p, w in zip(rows, weights, strict=True)) / total

    return {
        "version": max(int(p["fed_version"]) for p in rows),
        "accuracy": mean("fed_accuracy"),
        "loss": mean("fed_loss"),
        "source": "federated",
        "reporting": len(rows),
    }
