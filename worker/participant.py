"""One participant: the paper's epoch (Algorithm 1) against the global state.

download θd (most-updated) → overwrite → one local SGD epoch → Δw → select θu → clip ±γ →
publish, confirmed. The sequence number advances only after the broker confirms, and a message
whose confirm is lost is re-sent with the same sequence number (the aggregator's replay window
makes the second copy a no-op).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import BrokerError, ConfigError, StopRequested
from dssgd.shared.lifecycle import Backoff, StopFlag
from dssgd.shared.models import get_flat, layout_of, set_flat
from dssgd.shared.privacy import PrivacyAccountant, SvtParams, epsilon_for, noise_rng, svt_select
from dssgd.shared.selection import budget, most_updated, select_state
from dssgd.shared.store import RunStore
from dssgd.shared.tasks import LoadedTask, as_tensors, holdout, load_task
from dssgd.shared.training import LocalTrainer, refresh_norm_stats
from torch import nn
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


@dataclass
class EpochReport:
    seq: int
    base_version: int
    entries: int
    bytes_up: int
    bytes_down: int
    loss: float
    seconds_train: float
    seconds_total: float


def synthetic_values(rng: np.random.Generator, k: int, gamma: float) -> np.ndarray:
    """k values m·u, m in -3..3, u the largest power of two with 3u <= γ (u = 1 once γ >= 3):
    every |value| <= γ, and float32 sums of them are exact while they stay below 2**24·u."""
    unit = 1.0 if gamma >= 3 else 2.0 ** np.floor(np.log2(gamma / 3))
    return (rng.integers(-3, 4, size=k) * unit).astype(np.float32)


class Participant:
    def __init__(
        self,
        pid: int,
        cfg: RunConfig,
        store: RunStore,
        publisher: Publisher,
        stop: StopFlag,
        data: Dataset | None,  # this participant's local data (task.local_data); None if synthetic
        synthetic: bool = False,
        record_dir: Path | None = None,
        hmac_key: bytes | None = None,
        task: LoadedTask | None = None,
        model: nn.Module | None = None,  # own loop (worker/client.py): the user's own module
    ) -> None:
        self.pid, self.cfg, self.store, self.pub, self.stop = pid, cfg, store, publisher, stop
        self.synthetic = synthetic
        self.hmac_key = hmac_key
        self.rng = np.random.default_rng([cfg.seed, pid, int(time.time())])
        self.record = None
        if record_dir is not None:
            record_dir.mkdir(parents=True, exist_ok=True)
            self.record = (record_dir / f"confirmed-{pid}.jsonl").open("a")
        progress = store.progress(pid)
        self._restore_progress(progress)
        self.task = task or load_task(cfg.task)
        self._build(model, data)
        if cfg.dpsgd and self.trainer is not None:
            self._use_dpsgd(progress)
        self.local = get_flat(self.model)
        self.secure = None  # --secure two-server: shares out, both servers' state in
        if cfg.secure:
            from dssgd.worker.secure_send import SecureChannel

            self.secure = SecureChannel(cfg, store, self.task.initial_state(cfg.seed))
        self.budget_exhausted = ""
        self.svt: SvtParams | None = None
        self.accountant: PrivacyAccountant | None = None
        if cfg.dp_eps_per_value is not None:
            self._use_svt(progress)

    def _restore_progress(self, progress: dict[str, str]) -> None:
        """Counters from the last recorded epoch, and the next sequence number that is safe."""
        self.epochs = int(progress.get("epochs", 0))
        self.bytes_up = int(progress.get("bytes_up", 0))
        self.bytes_down = int(progress.get("bytes_down", 0))
        # Cumulative seconds: local SGD only, and the whole epoch (download to confirm).
        self.t_train = float(progress.get("t_train", 0.0))
        self.t_epoch = float(progress.get("t_epoch", 0.0))
        # Never reuse a sequence number that may already have been applied.
        self.seq = (
            max(
                int(progress.get("seq", 0)),
                int(progress.get("seq_sent", 0)),
                self.store.applied_high(self.pid),
            )
            + 1
        )

    def _use_svt(self, progress: dict[str, str]) -> None:
        """The paper's sparse vector technique, its accountant restored from progress."""
        cfg = self.cfg
        assert cfg.dp_eps_per_value is not None
        if self.layout.n_buffers:
            # Buffers are statistics of the local data sent whole: no DP bound covers them.
            raise ConfigError(
                f"task {cfg.task}: DP needs a model without buffers, and "
                f"{self.layout.slots[-1].name!r} is one (BatchNorm statistics leak data)"
            )
        c = budget(self.n, cfg.theta_u)
        self.svt = SvtParams(
            epsilon=epsilon_for(cfg.dp_eps_per_value, c),
            c=c,
            gamma=cfg.effective_gamma,
            tau=cfg.effective_tau,
        )
        # Noise from a cryptographically seeded generator, never from the run's seed.
        self.noise = noise_rng()
        self.accountant = (
            PrivacyAccountant.from_dict(
                {k[4:]: v for k, v in progress.items() if k.startswith("dp_")}
            )
            if any(k.startswith("dp_") for k in progress)
            else PrivacyAccountant(
                eps_per_epoch=self.svt.epsilon,
                delta_prime=cfg.dp_delta,
                budget=cfg.dp_budget,
                c=c,
            )
        )

    def _use_dpsgd(self, progress: dict[str, str]) -> None:
        """Replace the local epoch by DP-SGD, with σ derived from the run's ε, δ and length."""
        # Imported here: dp-accounting and torch.func cost about a second a process without DP.
        from dssgd.shared.accounting import DpSgdAccountant, noise_multiplier
        from dssgd.shared.dpsgd import DpSgdTrainer

        cfg, trainer = self.cfg, self.trainer
        assert cfg.dp_epsilon is not None and trainer is not None
        if self.layout.n_buffers:
            # Buffers are statistics of the local data sent whole: no DP bound covers them.
            raise ConfigError(
                f"task {cfg.task}: DP-SGD needs a model without buffers, and "
                f"{self.layout.slots[-1].name!r} is one (BatchNorm statistics leak data)"
            )
        x, y = trainer.x, trainer.y
        q = min(1.0, cfg.batch_size / len(x))
        steps = -(-len(x) // cfg.batch_size)
        sigma = cfg.dp_noise_multiplier or noise_multiplier(
            cfg.dp_epsilon, cfg.dp_delta, q, steps * cfg.epochs
        )
        self.trainer = DpSgdTrainer(  # type: ignore[assignment]
            self.model, x, y, cfg.lr, cfg.batch_size, cfg.dp_clip, sigma, loss=self.task.loss
        )
        self.dpsgd: DpSgdAccountant | None = DpSgdAccountant(
            sigma, q, cfg.dp_delta, cfg.dp_epsilon, int(progress.get("dp_steps", 0))
        )
        log.info(
            "participant %d: DP-SGD with σ %.4g, q %.4g, C %g", self.pid, sigma, q, cfg.dp_clip
        )

    def _dpsgd_exhausted(self) -> bool:
        acc = getattr(self, "dpsgd", None)
        if acc is None or self.trainer is None or acc.can_run(self.trainer.steps_per_epoch):
            return False
        if not self.budget_exhausted:
            nxt = acc.epsilon_after(acc.steps + self.trainer.steps_per_epoch)
            self.budget_exhausted = (
                f"privacy budget exhausted: DP-SGD ε spent {acc.total:.4g} (PLD, δ {acc.delta:g}),"
                f" one more epoch would make it {nxt:.4g} > budget {acc.budget:.4g}; "
                f"participant {self.pid} stops publishing"
            )
            log.warning("%s", self.budget_exhausted)
        return True

    def _record_dpsgd(self) -> None:
        """The steps just taken are spent whether or not the update is published: record them."""
        acc = getattr(self, "dpsgd", None)
        if acc is not None and self.trainer is not None:
            acc.steps += self.trainer.steps_per_epoch
            self.store.record_progress(self.pid, **{f"dp_{k}": v for k, v in acc.to_dict().items()})

    def _build(self, model: nn.Module | None, data: Dataset | None) -> None:
        """The model (the task's, or the own-loop user's) and the local trainer."""
        cfg, pid, synthetic = self.cfg, self.pid, self.synthetic
        self.model = model if model is not None else self.task.build_model(cfg.seed)
        self.layout = layout_of(self.model)
        self.n = self.layout.n  # parameters, then buffers (shared/models.py)
        self.trainer: LocalTrainer | None = None
        self.heldout: Dataset | None = None  # federated evaluation when there is no test set
        if not synthetic and data is not None:
            if not self.task.has_test_data:
                data, self.heldout = holdout(data, cfg.seed, pid)
            x, y = as_tensors(data)
            self.trainer = LocalTrainer(
                self.model,
                x,
                y,
                cfg.lr,
                cfg.batch_size,
                seed=cfg.seed * 100_003 + pid + self.epochs,
                loss=self.task.loss,
            )

    @property
    def done(self) -> bool:
        if self._dpsgd_exhausted():
            return True
        if self.accountant is not None and not self.accountant.can_spend():
            if not self.budget_exhausted:
                self.budget_exhausted = (
                    f"privacy budget exhausted: ε spent {self.accountant.total:.4g} of "
                    f"{self.accountant.budget:.4g}; participant {self.pid} stops publishing"
                )
                log.warning("%s", self.budget_exhausted)
            return True
        return self.cfg.epochs > 0 and self.epochs >= self.cfg.epochs

    # --- the epoch ------------------------------------------------------------------------------

    def run_epoch(self) -> EpochReport:
        """download → (evaluate) → train → select → publish, confirmed."""
        t0 = time.perf_counter()
        version, base, bytes_down = self.download()
        t1 = time.perf_counter()
        if self.synthetic:
            indices, values, loss = self._synthetic_update()
        else:
            set_flat(self.model, base)
            self._evaluate_download(version)
            t_sgd = time.perf_counter()
            assert self.trainer is not None
            loss = self.trainer.epoch()
            self.t_train += time.perf_counter() - t_sgd
            self._record_dpsgd()
            indices, values = self.select(base)
        return self.publish(
            version, indices, values, loss, bytes_down, t0, time.perf_counter() - t1
        )

    def download(self) -> tuple[int, np.ndarray, int]:
        """θd of the global state into the local copy: (version, base state, bytes read)."""
        if self.cfg.ordered:
            self.store.trace("d", self.pid, self.seq)
        own_buffers = self.local[self.layout.n_params :].copy()
        if self.secure is not None:
            version, bytes_down = self._secure_download()
        else:
            # Only the chosen chunks are read, straight into the local copy; the bytes are those
            # the Redis connection received for this download (shared/store.py).
            got = self.store.download(
                self.local,
                self.cfg.theta_d,
                self.rng if self.cfg.download == "random" and self.cfg.theta_d < 1.0 else None,
            )
            version, bytes_down = got.version, got.bytes_received
        if self.cfg.buffers == "local":
            self.local[self.layout.n_params :] = own_buffers  # they never leave, nor come in
        if getattr(self, "_base", None) is None:
            self._base = np.empty_like(self.local)  # reused: fresh large arrays cost here
        np.copyto(self._base, self.local)
        return version, self._base, bytes_down

    def _secure_download(self) -> tuple[int, int]:
        """Both servers' shares at one offset, joined; the bytes both connections received."""
        assert self.secure is not None
        version, w, stat = self.secure.read_params(with_stat=self.cfg.theta_d < 1.0)
        if self.cfg.theta_d >= 1.0:
            self.local[:] = w
        else:
            if self.cfg.download == "random":
                k = max(1, round(self.cfg.theta_d * self.n))
                chosen = np.sort(self.rng.choice(self.n, size=k, replace=False))
            else:
                assert stat is not None
                chosen = most_updated(stat, self.cfg.theta_d)
            self.local[chosen] = w[chosen]
        return version, self.secure.reader.bytes_read

    def select(self, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Δw of the trained model against ``base``, selected, clipped (buffers whole)."""
        get_flat(self.model, out=self.local)
        delta = self.local - base
        if self.svt is not None:
            return self._private_selection(delta)
        indices, values = select_state(
            delta,
            self.layout.n_params,
            self.cfg.theta_u,
            self.cfg.effective_gamma,
            self.cfg.selection,
            self.cfg.effective_tau,
            self.rng,
            send_buffers=self.cfg.buffers == "whole",
        )
        if self.layout.n_buffers and self.cfg.buffers == "whole":
            values[-self.layout.n_buffers :] = self._buffer_delta(base, indices, values)
        return indices, values

    def publish(
        self,
        version: int,
        indices: np.ndarray,
        values: np.ndarray,
        loss: float,
        bytes_down: int,
        t0: float,
        seconds_train: float,
    ) -> EpochReport:
        """Encode, burn the sequence number, publish until confirmed, record progress."""
        body = self._encode(version, indices, values)
        self._burn_seq(indices, values)
        self._publish(body)
        confirmed_seq, self.seq = self.seq, self.seq + 1
        self._log_record({"seq": confirmed_seq, "state": "confirmed"})
        self.epochs += 1
        self.bytes_up += len(body)
        self.bytes_down += bytes_down
        self.t_epoch += time.perf_counter() - t0
        report = EpochReport(
            confirmed_seq,
            version,
            int(indices.size),
            len(body),
            bytes_down,
            loss,
            seconds_train,
            time.perf_counter() - t0,
        )
        self._record_epoch(report)
        return report

    def _encode(self, version: int, indices: np.ndarray, values: np.ndarray) -> bytes:
        """The update under the current sequence number, in the run's value coding."""
        if self.secure is not None:
            return self.secure.encode(
                self.pid, self.seq, version, self.n, indices, values, self.hmac_key
            )
        update = wire.Update(
            run_id=self.cfg.run_id,
            participant=self.pid,
            seq=self.seq,
            base_version=version,
            n=self.n,
            indices=indices,
            values=values,
        )
        return wire.encode(
            update,
            values=self.cfg.value_coding,
            rng=self.rng,
            key=self.hmac_key,
            bound=self.cfg.effective_gamma,  # a lossy coding must not push ±γ beyond γ
        )

    def _burn_seq(self, indices: np.ndarray, values: np.ndarray) -> None:
        # Burn the sequence number before it can reach the broker: a restart after a crash
        # between publish and confirm must never reuse it for different content.
        self.store.record_progress(self.pid, seq_sent=self.seq)
        self._log_record(
            {
                "seq": self.seq,
                "state": "sent",
                "indices": indices.tolist(),
                "values": values.tolist(),
            }
        )

    def _record_epoch(self, report: EpochReport) -> None:
        """The confirmed epoch's counters, so a restart resumes after it."""
        self.store.record_progress(
            self.pid,
            epochs=self.epochs,
            seq=report.seq,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            # A loss computed on the local data is outside every DP mechanism: not published.
            loss="nan" if self.cfg.dp_on else f"{report.loss:.5f}",
            last_seen=f"{time.time():.3f}",
            base_version=report.base_version,
            entries=report.entries,
            t_train=f"{self.t_train:.4f}",
            t_epoch=f"{self.t_epoch:.4f}",
        )

    def _buffer_delta(
        self, base: np.ndarray, indices: np.ndarray, values: np.ndarray
    ) -> np.ndarray:
        """Buffers for the state this update moves the global model to, as a change from base.

        BatchNorm statistics only mean something next to the parameters they were measured
        with. The locally trained model's are measured with all of its changes, but only θu of
        them, clipped, reach the global model; so they are measured again, in one pass over the
        local data, for base + the shared change (docs/TASKS.md, measured).
        """
        k = self.layout.n_params
        shared = indices < k
        projected = base.copy()
        projected[indices[shared]] += values[shared]
        set_flat(self.model, projected)
        x = self.trainer.x if self.trainer is not None else None  # own loop: no data here
        if x is None or not refresh_norm_stats(self.model, x, self.cfg.batch_size):
            return (self.local - base)[k:]  # other buffers: their change after the epoch
        return get_flat(self.model)[k:] - base[k:]

    def _evaluate_download(self, version: int) -> None:
        """Federated evaluation: the downloaded global model on this participant's held-out part."""
        if self.heldout is None:
            return
        m = self.task.metrics(self.model, self.heldout)
        self.store.record_progress(
            self.pid,
            fed_version=version,
            fed_examples=len(self.heldout),  # type: ignore[arg-type]
            **{f"fed_{k}": f"{v:.6g}" for k, v in m.items()},
        )

    def _private_selection(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sparse vector technique; the ε is spent and recorded before anything is sent."""
        assert self.svt is not None and self.accountant is not None
        self.accountant.spend()  # raises BudgetExhausted rather than exceed the budget
        self.store.record_progress(
            self.pid, **{f"dp_{k}": v for k, v in self.accountant.to_dict().items()}
        )
        return svt_select(delta, self.svt, self.noise)

    def _log_record(self, entry: dict[str, object]) -> None:
        """Test oracle: what was sent (before publishing) and what the broker confirmed."""
        if self.record is not None:
            self.record.write(json.dumps(entry) + "\n")
            self.record.flush()

    def _synthetic_update(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Small multiples of a power of two within ±γ: sums are exact, so the global state is an
        exact oracle (with a zero start and the sum rule)."""
        k = int(self.rng.integers(1, budget(self.n, self.cfg.theta_u) + 1))
        indices = np.sort(self.rng.choice(self.n, size=k, replace=False)).astype(np.int64)
        values = synthetic_values(self.rng, k, self.cfg.effective_gamma)
        return indices, values, 0.0

    def _publish(self, body: bytes) -> None:
        """Publish until confirmed; same bytes (same seq) on every retry. Backs off, never drops."""
        backoff = Backoff(initial=0.1, cap=5.0)
        key = AmqpNames.routing_key(self.pid)
        while True:
            try:
                self.pub.publish(
                    key,
                    body,
                    headers={"participant": self.pid, "seq": self.seq},
                    exchange=self.secure.exchange if self.secure is not None else None,
                )
                return
            except BrokerError as exc:
                log.warning(
                    "participant %d seq %d not confirmed (%s); retrying", self.pid, self.seq, exc
                )
                if not backoff.sleep(self.stop):
                    # A stop during retries leaves this update unconfirmed: never counted.
                    raise StopRequested(f"stopped with seq {self.seq} unconfirmed") from exc

    def close(self) -> None:
        if self.record is not None:
            self.record.close()
