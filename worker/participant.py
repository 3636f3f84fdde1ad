"""One participant: the paper's epoch (Algorithm 1) against the global state.

download θd (most-updated) → overwrite → one local SGD epoch → Δw → select θu → clip ±γ →
publish, confirmed. A message whose confirm is lost is re-sent with the same sequence number (the
aggregator's replay window makes the second copy a no-op), and every sequence number is burned
(recorded in Redis) before its message can reach the broker.

Light participants: a process hosting thousands of participants keeps one model object, one
trainer and one scratch state vector (``SharedModel``); a participant owns only its counters,
its random generator, its accountant, the row indices of its examples in a shared read-only
tensor (``LocalData``) and, only when they outlive an epoch (θd < 1, or buffers kept local), its
own parameters. Its state is loaded into the shared model before each local epoch.

An epoch splits into ``prepare`` (download, train, select, encode: the training thread) and
``deliver`` (burn the sequence number, publish until confirmed, record progress), which the
worker may run on its sending thread (asynchronous order) while the next epoch trains.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dssgd.shared import wire
from dssgd.shared.amqp_names import AmqpNames
from dssgd.shared.broker import Publisher
from dssgd.shared.config import RunConfig
from dssgd.shared.errors import (
    BrokerError,
    ConfigError,
    StopRequested,
    StoreError,
    is_permanent,
)
from dssgd.shared.lifecycle import Backoff, StopFlag
from dssgd.shared.models import get_flat, layout_of, set_flat
from dssgd.shared.privacy import PrivacyAccountant, SvtParams, epsilon_for, noise_rng, svt_select
from dssgd.shared.selection import budget, most_updated, select_state
from dssgd.shared.store import RunStore
from dssgd.shared.tasks import LoadedTask, as_tensors, holdout, load_task
from dssgd.shared.training import LocalTrainer, refresh_norm_stats
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

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


@dataclass
class Outgoing:
    """One encoded update between ``prepare`` and ``deliver``: its sequence number is taken
    (never reused by this process) but not yet burned in Redis, nor sent."""

    seq: int
    bodies: list[bytes]  # one message, or one per range shard (wire.encode_parts)
    indices: np.ndarray
    values: np.ndarray
    report: EpochReport
    bytes_down: int
    t0: float  # perf_counter at the start of the epoch (download)
    seconds_epoch: float  # training thread's time: download to encoded


def synthetic_values(rng: np.random.Generator, k: int, gamma: float) -> np.ndarray:
    """k values m·u, m in -3..3, u the largest power of two with 3u <= γ (u = 1 once γ >= 3):
    every |value| <= γ, and float32 sums of them are exact while they stay below 2**24·u."""
    unit = 1.0 if gamma >= 3 else 2.0 ** np.floor(np.log2(gamma / 3))
    return (rng.integers(-3, 4, size=k) * unit).astype(np.float32)


@dataclass
class LocalData:
    """A participant's examples: ``rows`` of a tensor pair shared by the process (read-only), or,
    when ``rows`` is None, a pair of its own."""

    x: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor | None = None

    @classmethod
    def of(cls, ds: Dataset) -> LocalData:
        """Indices into the dataset's tensors when it is a (nested) Subset of a TensorDataset,
        so thousands of participants share one copy of the examples; else the examples stacked."""
        idx: np.ndarray | None = None
        inner = ds
        while isinstance(inner, Subset):
            here = np.asarray(inner.indices, dtype=np.int64)
            idx = here if idx is None else here[idx]
            inner = inner.dataset
        if idx is not None and isinstance(inner, TensorDataset) and len(inner.tensors) == 2:
            return cls(inner.tensors[0], inner.tensors[1], torch.from_numpy(idx))
        x, y = as_tensors(ds)
        return cls(x, y)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.x)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples themselves (a copy when they are rows of a shared pair)."""
        if self.rows is None:
            return self.x, self.y
        return self.x[self.rows], self.y[self.rows]


class SharedModel:
    """What every participant of one process shares: the model object, its layout, one trainer
    and a scratch state vector. Nothing of it outlives a participant's epoch."""

    def __init__(self, task: LoadedTask, cfg: RunConfig, model: nn.Module | None = None) -> None:
        self.task, self.cfg = task, cfg
        self.model = model if model is not None else task.build_model(cfg.seed)
        self.layout = layout_of(self.model)
        self.initial = get_flat(self.model)  # where a participant's own parameters start
        # The task's model (never a user's own module): its parameters become views into one
        # vector, so loading a state before an epoch and reading it after are single copies.
        self.flat = flat_view(self.model) if model is None else None
        self.scratch = self.flat if self.flat is not None else self.initial.copy()
        self._trainer: LocalTrainer | None = None

    def trainer(self, data: LocalData, seed: int) -> LocalTrainer:
        """The process's trainer, bound to one participant's examples and shuffling seed."""
        if self._trainer is None:
            self._trainer = LocalTrainer(
                self.model, data.x, data.y, self.cfg.lr, self.cfg.batch_size, seed,
                loss=self.task.loss, rows=data.rows,
            )  # fmt: skip
        else:
            self._trainer.bind(data.x, data.y, data.rows, seed)
        return self._trainer


def flat_view(model: nn.Module) -> np.ndarray | None:
    """Make every parameter of a buffer-free float32 model a view into one float32 vector, in
    the flat layout's order, and return that vector (numpy, shared memory); None otherwise."""
    params = list(model.named_parameters())
    if list(model.buffers()) or any(p.dtype != torch.float32 for _, p in params):
        return None
    flat = torch.empty(sum(p.numel() for _, p in params), dtype=torch.float32)
    pos = 0
    with torch.no_grad():
        for _, p in params:
            k = p.numel()
            view = flat[pos : pos + k].view(p.shape)
            view.copy_(p)
            p.data = view
            pos += k
    return flat.numpy()


def epoch_seed(seed: int, pid: int, epoch: int) -> int:
    """The shuffling seed of one participant's epoch: deterministic, so nothing is kept for it."""
    return int(np.random.SeedSequence([seed, pid, epoch]).generate_state(1, np.uint64)[0] >> 1)


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
        shared: SharedModel | None = None,  # the process's model (worker/service.py)
        restored: tuple[dict[str, str], int] | None = None,  # (progress, applied high), prefetched
    ) -> None:
        self.pid, self.cfg, self.store, self.pub, self.stop = pid, cfg, store, publisher, stop
        self.synthetic = synthetic
        self.hmac_key = hmac_key
        self.rng = np.random.default_rng([cfg.seed, pid, int(time.time())])
        self.record = None
        if record_dir is not None:
            record_dir.mkdir(parents=True, exist_ok=True)
            self.record = (record_dir / f"confirmed-{pid}.jsonl").open("a")
        progress, applied = restored or (store.progress(pid), store.applied_high(pid))
        self._restore_progress(progress, applied)
        self.task = task or load_task(cfg.task)
        self.shared = shared or SharedModel(self.task, cfg, model)
        self._build(data)
        # The run's range shards: an update too large for one message travels as one part per
        # shard, and the base version is recorded per shard (shared/chunks.py Layout).
        spans = [(0, self.n)]
        if not cfg.secure:
            layout = store.layout()
            spans = [layout.shard_span(s) for s in range(layout.shards)]
        self.spans: list[tuple[int, int]] = spans
        self.bases: list[int] = [0] * len(spans)
        if cfg.dpsgd and self.data is not None:
            self._use_dpsgd(progress)
        self.secure = None  # --secure two-server: shares out, both servers' state in
        if cfg.secure:
            from dssgd.worker.secure_send import SecureChannel

            self.secure = SecureChannel(cfg, store, self.task.initial_state(cfg.seed))
        self.budget_exhausted = ""
        self.svt: SvtParams | None = None
        self.accountant: PrivacyAccountant | None = None
        if cfg.dp_eps_per_value is not None:
            self._use_svt(progress)

    @property
    def model(self) -> nn.Module:
        return self.shared.model

    def _restore_progress(self, progress: dict[str, str], applied: int) -> None:
        """Counters from the last recorded epoch, and the next sequence number that is safe."""
        self.epochs = int(progress.get("epochs", 0))  # confirmed epochs
        self.sent = self.epochs  # epochs handed to deliver (confirmed or on their way)
        self.bytes_up = int(progress.get("bytes_up", 0))
        self.bytes_down = int(progress.get("bytes_down", 0))
        # Cumulative seconds: local SGD only, and the whole epoch (download to confirm; with
        # sending overlapped, download to hand-off: the confirm no longer holds training up).
        self.t_train = float(progress.get("t_train", 0.0))
        self.t_epoch = float(progress.get("t_epoch", 0.0))
        # Never reuse a sequence number that may already have been applied.
        self.seq = max(int(progress.get("seq", 0)), int(progress.get("seq_sent", 0)), applied) + 1

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

    @property
    def layout(self):  # type: ignore[no-untyped-def]
        return self.shared.layout

    @property
    def n(self) -> int:
        return self.shared.layout.n  # parameters, then buffers (shared/models.py)

    def _use_dpsgd(self, progress: dict[str, str]) -> None:
        """Replace the local epoch by DP-SGD, with σ derived from the run's ε, δ and length."""
        # Imported here: dp-accounting and torch.func cost about a second a process without DP.
        from dssgd.shared.accounting import DpSgdAccountant, noise_multiplier
        from dssgd.shared.dpsgd import DpSgdTrainer

        cfg = self.cfg
        assert cfg.dp_epsilon is not None and self.data is not None
        if self.layout.n_buffers:
            # Buffers are statistics of the local data sent whole: no DP bound covers them.
            raise ConfigError(
                f"task {cfg.task}: DP-SGD needs a model without buffers, and "
                f"{self.layout.slots[-1].name!r} is one (BatchNorm statistics leak data)"
            )
        x, y = self.data.tensors()
        q = min(1.0, cfg.batch_size / len(x))
        steps = -(-len(x) // cfg.batch_size)
        sigma = cfg.dp_noise_multiplier or noise_multiplier(
            cfg.dp_epsilon, cfg.dp_delta, q, steps * cfg.epochs
        )
        # Its own trainer (on the shared model object): DP-SGD keeps a secure generator.
        self.own_trainer = DpSgdTrainer(
            self.model, x, y, cfg.lr, cfg.batch_size, cfg.dp_clip, sigma, loss=self.task.loss
        )
        self.dpsgd: DpSgdAccountant | None = DpSgdAccountant(
            sigma, q, cfg.dp_delta, cfg.dp_epsilon, int(progress.get("dp_steps", 0))
        )
        log.info(
            "participant %d: DP-SGD with σ %.4g, q %.4g, C %g", self.pid, sigma, q, cfg.dp_clip
        )

    def _steps_per_epoch(self) -> int:
        assert self.data is not None
        return -(-len(self.data) // self.cfg.batch_size)

    def _dpsgd_exhausted(self) -> bool:
        acc = getattr(self, "dpsgd", None)
        if acc is None or self.data is None or acc.can_run(self._steps_per_epoch()):
            return False
        if not self.budget_exhausted:
            nxt = acc.epsilon_after(acc.steps + self._steps_per_epoch())
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
        if acc is not None and self.data is not None:
            acc.steps += self._steps_per_epoch()
            self.store.record_progress(self.pid, **{f"dp_{k}": v for k, v in acc.to_dict().items()})

    def _build(self, data: Dataset | None) -> None:
        """The local examples (as rows of the shared tensors where possible) and, only when they
        outlive an epoch, this participant's own parameters."""
        cfg = self.cfg
        self.data: LocalData | None = None
        self.heldout: Dataset | None = None  # federated evaluation when there is no test set
        if not self.synthetic and data is not None:
            if not self.task.has_test_data:
                data, self.heldout = holdout(data, cfg.seed, self.pid)
            self.data = LocalData.of(data)
        # θd = 1 overwrites the whole state at every download, so it needs no copy of its own;
        # θd < 1 keeps what was not downloaded, and buffers kept local never come in.
        keeps = cfg.theta_d < 1.0 or (cfg.buffers == "local" and self.layout.n_buffers > 0)
        self.local: np.ndarray | None = self.shared.initial.copy() if keeps else None

    def _state(self) -> np.ndarray:
        """The state vector this participant works in: its own, or the process's scratch."""
        return self.local if self.local is not None else self.shared.scratch

    @property
    def done(self) -> bool:
        """No more epochs to take (its epochs handed off, or its privacy budget spent)."""
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
        return self.cfg.epochs > 0 and self.sent >= self.cfg.epochs

    @property
    def confirmed(self) -> bool:
        """Every update handed off so far is confirmed (none in flight)."""
        return self.epochs >= self.sent

    # --- the epoch ------------------------------------------------------------------------------

    def run_epoch(self) -> EpochReport:
        """download → (evaluate) → train → select → publish, confirmed."""
        return self.deliver(self.prepare())

    def prepare(self) -> Outgoing:
        """The training thread's part: download → (evaluate) → train → select → encode."""
        t0 = time.perf_counter()
        version, base, bytes_down = self.download()
        t1 = time.perf_counter()
        if self.synthetic:
            indices, values, loss = self._synthetic_update()
        else:
            if self._state() is not self.shared.flat:  # else the download already loaded it
                set_flat(self.model, base)
            self._evaluate_download(version)
            t_sgd = time.perf_counter()
            loss = self._train()
            self.t_train += time.perf_counter() - t_sgd
            self._record_dpsgd()
            indices, values = self.select(base)
        return self.outgoing(version, indices, values, loss, bytes_down, t0, t1)

    def _train(self) -> float:
        assert self.data is not None
        own = getattr(self, "own_trainer", None)
        if own is not None:
            return float(own.epoch())
        seed = epoch_seed(self.cfg.seed, self.pid, self.sent)
        return self.shared.trainer(self.data, seed).epoch()

    def download(self) -> tuple[int, np.ndarray, int]:
        """θd of the global state into the local copy: (version, base state, bytes read)."""
        if self.cfg.ordered:
            self.store.trace("d", self.pid, self.seq)
        local = self._state()
        own_buffers = local[self.layout.n_params :].copy()
        if self.secure is not None:
            version, bytes_down = self._secure_download(local)
        else:
            # Only the chosen chunks are read, straight into the local copy; the bytes are those
            # the Redis connection received for this download (shared/store.py).
            got = self.store.download(
                local,
                self.cfg.theta_d,
                self.rng if self.cfg.download == "random" and self.cfg.theta_d < 1.0 else None,
            )
            # Per range shard, the version its values came from; a shard not read keeps the
            # base of the download that last read it (the update rule weighs each shard's part
            # by that shard's own staleness, aggregator/batch.py).
            for s, v in enumerate(got.versions):
                if v is not None:
                    self.bases[s] = v
            version, bytes_down = min(self.bases), got.bytes_received
        if self.cfg.buffers == "local":
            local[self.layout.n_params :] = own_buffers  # they never leave, nor come in
        return version, local.copy(), bytes_down

    def _secure_download(self, local: np.ndarray) -> tuple[int, int]:
        """Both servers' shares at one offset, joined; the bytes both connections received."""
        assert self.secure is not None
        version, w, stat = self.secure.read_params(with_stat=self.cfg.theta_d < 1.0)
        if self.cfg.theta_d >= 1.0:
            local[:] = w
        else:
            if self.cfg.download == "random":
                k = max(1, round(self.cfg.theta_d * self.n))
                chosen = np.sort(self.rng.choice(self.n, size=k, replace=False))
            else:
                assert stat is not None
                chosen = most_updated(stat, self.cfg.theta_d)
            local[chosen] = w[chosen]
        return version, self.secure.reader.bytes_read

    def select(self, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Δw of the trained model against ``base``, selected, clipped (buffers whole)."""
        local = self._state()
        if local is not self.shared.flat:  # else the model's parameters are `local` itself
            get_flat(self.model, out=local)
        delta = local - base
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
        t1 = time.perf_counter() - seconds_train
        return self.deliver(self.outgoing(version, indices, values, loss, bytes_down, t0, t1))

    def outgoing(
        self,
        version: int,
        indices: np.ndarray,
        values: np.ndarray,
        loss: float,
        bytes_down: int,
        t0: float,
        t1: float,
    ) -> Outgoing:
        """Encode under the next sequence number, which this process never hands out again."""
        seq = self.seq
        bodies = self._encode(seq, version, indices, values)
        self.seq, self.sent = seq + 1, self.sent + 1
        now = time.perf_counter()
        size = sum(len(b) for b in bodies)
        report = EpochReport(
            seq, version, int(indices.size), size, bytes_down, loss, now - t1, now - t0
        )
        return Outgoing(seq, bodies, indices, values, report, bytes_down, t0, now - t0)

    def deliver(self, out: Outgoing, overlapped: bool = False) -> EpochReport:
        """Burn the sequence number, publish until confirmed, record the epoch.

        Runs on the training thread, or on the worker's sending thread while the next epoch
        trains (``overlapped``: then the epoch's time is the training thread's, not the wait)."""
        self._retry_store(lambda: self._burn_seq(out.seq, out.indices, out.values))
        for body in out.bodies:  # a split update: every part confirmed, shard 0's last
            self._publish(body, out.seq)
        self._log_record({"seq": out.seq, "state": "confirmed"})
        self.epochs += 1
        self.bytes_up += out.report.bytes_up
        self.bytes_down += out.bytes_down
        self.t_epoch += out.seconds_epoch if overlapped else time.perf_counter() - out.t0
        if not overlapped:
            out.report.seconds_total = time.perf_counter() - out.t0
        self._retry_store(lambda: self._record_epoch(out.report))
        return out.report

    def _retry_store(self, fn) -> None:  # type: ignore[no-untyped-def]
        """A Redis write that must happen exactly here (never skipped, never re-sent around)."""
        backoff = None  # made on the first failure: seeding its generator costs every epoch
        while True:
            try:
                fn()
                return
            except StoreError as exc:
                if is_permanent(exc):  # rights or a password taken away mid-run: end, say why
                    log.error("participant %d: %s: retrying cannot help, stopping", self.pid, exc)
                    raise
                log.warning("participant %d: %s; retrying", self.pid, exc)
                backoff = backoff or Backoff(initial=0.1, cap=5.0)
                if not backoff.sleep(self.stop):
                    raise StopRequested(f"stopped while retrying: {exc}") from exc

    def _encode(
        self, seq: int, version: int, indices: np.ndarray, values: np.ndarray
    ) -> list[bytes]:
        """The update under sequence number ``seq``, in the run's value coding: one message, or
        one per range shard when it would exceed one broker message (wire.encode_parts)."""
        if self.secure is not None:
            return [
                self.secure.encode(self.pid, seq, version, self.n, indices, values, self.hmac_key)
            ]
        update = wire.Update(
            run_id=self.cfg.run_id,
            participant=self.pid,
            seq=seq,
            base_version=version,
            n=self.n,
            indices=indices,
            values=values,
            bases=tuple(self.bases) if len(self.bases) > 1 else None,
        )
        return wire.encode_parts(
            update,
            self.spans,
            values=self.cfg.value_coding,
            rng=self.rng,
            key=self.hmac_key,
            bound=self.cfg.effective_gamma,  # a lossy coding must not push ±γ beyond γ
        )

    def _burn_seq(self, seq: int, indices: np.ndarray, values: np.ndarray) -> None:
        # Burn the sequence number before it can reach the broker: a restart after a crash
        # between publish and confirm must never reuse it for different content.
        self.store.record_progress(self.pid, seq_sent=seq)
        if self.record is not None:  # the oracle's copy: tolist() costs ~0.4 ms per update
            self._log_record(
                {
                    "seq": seq,
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
        x = self.data.tensors()[0] if self.data is not None else None  # own loop: no data here
        if x is None or not refresh_norm_stats(self.model, x, self.cfg.batch_size):
            return (self._state() - base)[k:]  # other buffers: their change after the epoch
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

    def _publish(self, body: bytes, seq: int) -> None:
        """Publish until confirmed; same bytes (same seq) on every retry. Backs off, never drops."""
        backoff = None  # made on the first failure
        key = AmqpNames.routing_key(self.pid)
        while True:
            try:
                self.pub.publish(
                    key,
                    body,
                    headers={"participant": self.pid, "seq": seq},
                    exchange=self.secure.exchange if self.secure is not None else None,
                )
                return
            except BrokerError as exc:
                log.warning(
                    "participant %d seq %d not confirmed (%s); retrying", self.pid, seq, exc
                )
                backoff = backoff or Backoff(initial=0.1, cap=5.0)
                if not backoff.sleep(self.stop):
                    # A stop during retries leaves this update unconfirmed: never counted.
                    raise StopRequested(f"stopped with seq {seq} unconfirmed") from exc

    def close(self) -> None:
        if self.record is not None:
            self.record.close()
