"""The audited participant, its data, the never-seen records and the model states it starts from.

Everything comes from the task (shared/tasks.py): the participant's records are
``local_data(ctx)`` of participant 0, the "trained" global model is trained with the project's
own LocalTrainer on the records of the other participants, and the non-members (records nobody
trained on) are the task's test set, topped up with records of participants that took no part
in any training here. A second participant with a label-skewed partition (``classes:k``) is the
target of the label-set attack, where an IID shard holding every class would make it trivial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dssgd.shared.errors import ConfigError
from dssgd.shared.models import StateLayout, get_flat, set_flat
from dssgd.shared.tasks import LoadedTask, TaskContext, as_tensors, load_task
from dssgd.shared.training import LocalTrainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """What stays fixed across a sweep (the run's configuration the audit imitates)."""

    task: str = "mnist-mlp"
    # How the task splits its data: participant 0 is audited, 1..5 train the "trained" model,
    # the rest are never-seen records (20 × 600 MNIST images: 8,400 of them).
    participants: int = 20
    shard_size: int | None = 600  # records of the audited participant (None: the task's own)
    lr: float = 0.2  # the run's defaults (shared/config.py)
    batch_size: int = 32
    seed: int = 1
    non_members: int = 5000  # never-seen records against which members are scored
    pretrain_participants: int = 5  # other participants whose records make the "trained" model
    pretrain_epochs: int = 3
    label_classes: int = 3  # classes held by the label-skewed participant
    run_epochs: int = 30  # run length DP-SGD's σ is derived for (as the worker does)
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    value_coding: str = "f32"
    bootstrap: int = 200  # resamples behind every confidence interval
    # DP noise: None draws it from the OS CSPRNG as the worker does; a seed makes a test's
    # draw reproducible (never for a figure that is reported).
    noise_seed: int | None = None

    def check(self) -> None:
        problems = []
        if not 1 <= self.participants <= 10_000:
            problems.append(f"--participants must be 1..10000, got {self.participants}")
        if self.shard_size is not None and self.shard_size < 2:
            problems.append(f"--shard-size must be >= 2, got {self.shard_size}")
        if self.non_members < 10:
            problems.append(f"--non-members must be >= 10, got {self.non_members}")
        if self.bootstrap < 20:
            problems.append(f"--bootstrap must be >= 20, got {self.bootstrap}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def gamma(self) -> float:
        return self.lr / 4  # the run's default γ (RunConfig.effective_gamma)


@dataclass
class Records:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def take(self, k: int) -> Records:
        return Records(self.x[:k], self.y[:k])


@dataclass
class Scenario:
    """The loaded task with its data and its two model states (flat float32 vectors)."""

    setting: Setting
    task: LoadedTask
    layout: StateLayout
    members: Records  # the audited participant's records
    non_members: Records  # records nobody trained on
    skewed: Records  # the label-skewed participant's records
    states: dict[str, np.ndarray] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cache: dict[object, object] = field(default_factory=dict)  # per-state results, e.g. norms

    def model(self, state: np.ndarray | None = None) -> nn.Module:
        m = self.task.build_model(self.setting.seed)
        if state is not None:
            set_flat(m, state)
        return m

    @property
    def never_seen(self) -> Records:
        """The reconstruction control: as many never-seen records as there are members."""
        return self.non_members.take(len(self.members))


def _ctx(s: Setting, participant: int, partition: str = "iid") -> TaskContext:
    return TaskContext(participant, s.participants, s.seed, None, partition, s.shard_size)


def _records(task: LoadedTask, ctx: TaskContext) -> Records:
    x, y = as_tensors(task.local_data(ctx))
    return Records(x.detach().float() if x.is_floating_point() else x, y)


def _cat(parts: list[Records]) -> Records:
    return Records(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def _non_members(task: LoadedTask, s: Setting, first_unused: int) -> tuple[Records, list[str]]:
    """Records of participants that took no part, then the test set, up to s.non_members.

    Other participants' records come first: they are drawn like the members (MNIST's test set
    was written by other people, and a score that tells the two sets apart would pass for
    membership).
    """
    parts: list[Records] = []
    p = first_unused
    while sum(len(r) for r in parts) < s.non_members and p < s.participants:
        parts.append(_records(task, _ctx(s, p)))
        p += 1
    notes = []
    if sum(len(r) for r in parts) < s.non_members:
        test = task.test_data(_ctx(s, -1))
        if test is not None:
            parts.append(Records(*as_tensors(test)))
            notes.append("non-members include the task's test set (not enough participants)")
    if not parts:
        raise ConfigError(f"task {s.task}: no records are left over to serve as non-members")
    pool = _cat(parts)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(s.seed))
    pool = Records(pool.x[order], pool.y[order]).take(s.non_members)
    if len(pool) < s.non_members:
        notes.append(
            f"only {len(pool)} non-members exist for task {s.task} (asked {s.non_members}): "
            "membership intervals are wider"
        )
    return pool, notes


def _skewed(
    task: LoadedTask, s: Setting, members: Records, pool: Records, notes: list[str]
) -> Records:
    """The label attack's participant: ``classes:k`` of the task's data, k below all classes."""
    if members.y.is_floating_point():
        return members  # regression targets: the label attack says it does not apply
    classes = len(torch.unique(torch.cat([members.y, pool.y])))
    k = min(s.label_classes, classes - 1)
    if k >= 1:
        try:
            return _records(task, _ctx(s, 0, f"classes:{k}"))
        except ConfigError as exc:  # the task's own partitioning refused it
            notes.append(f"label attack on the IID participant: {exc}")
    return members


def _train(scn: Scenario, data: Records, epochs: int) -> np.ndarray:
    s = scn.setting
    model = scn.model()
    trainer = LocalTrainer(model, data.x, data.y, s.lr, s.batch_size, s.seed, loss=scn.task.loss)
    for _ in range(epochs):
        trainer.epoch()
    return get_flat(model)


def load(s: Setting) -> Scenario:
    """Find the task, cut its data and train the "trained" global model (seconds for MNIST)."""
    s.check()
    task = load_task(s.task)
    members = _records(task, _ctx(s, 0))
    helpers = list(range(1, min(s.participants, 1 + s.pretrain_participants)))
    non_members, notes = _non_members(task, s, 1 + len(helpers))
    skewed = _skewed(task, s, members, non_members, notes)
    scn = Scenario(s, task, task.layout, members, non_members, skewed, notes=notes)
    scn.states["initial"] = task.initial_state(s.seed)
    if helpers:
        pretrain = _cat([_records(task, _ctx(s, p)) for p in helpers])
        scn.states["trained"] = _train(scn, pretrain, s.pretrain_epochs)
    else:
        scn.notes.append("one participant only: no other records to train a model, no 'trained'")
    for name, state in scn.states.items():
        scn.accuracy[name] = accuracy(scn, state)
    log.info("audit scenario: %d members, %d non-members", len(members), len(non_members))
    return scn


@torch.no_grad()
def accuracy(scn: Scenario, state: np.ndarray) -> float:
    """Accuracy of a state on the non-members (how "trained" the trained model is)."""
    model = scn.model(state)
    model.eval()
    x, y = scn.non_members.x, scn.non_members.y
    if y.is_floating_point():
        return float("nan")
    return float((model(x).argmax(1) == y).float().mean())
