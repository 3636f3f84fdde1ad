"""Tasks: the user's model and data, found by name, checked once, used by every process.

A task is any object with (duck typing; nothing from dssgd needs importing, see docs/TASKS.md):

* ``build_model() -> torch.nn.Module`` — the same architecture in every process; dssgd builds it
  under ``torch.manual_seed(run seed)``, so every process starts from the same state;
* ``local_data(ctx) -> Dataset`` of ``(input, target)`` pairs: this participant's data
  (``ctx.participant``, ``ctx.participants``, ``ctx.seed``, ``ctx.data_dir``; ``ctx.split(ds)``
  cuts a participant's part of a dataset with the run's partitioner);
* ``test_data() -> Dataset | None`` — what the aggregator evaluates on (``None``: participants
  evaluate on a held-out part of their own data instead);
* optional ``loss(output, target)`` (default: cross-entropy on logits) and
  ``metrics(model, dataset) -> dict[str, float]`` (default: accuracy and loss).

``--task`` names it as ``path/to/file.py:NAME``, ``package.module:NAME``, a built-in name
(``mnist-mlp``, ``mnist-cnn``, ``breast-cancer``) or a name registered under the entry-point
group ``dssgd.tasks``. A class is instantiated without arguments. Every mistake in a task comes
back as one ``TaskError`` line that names the task and what is wrong, never as a traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from shared import partition, plugins
from shared.models import StateLayout, fingerprint_of, first_difference, get_flat, layout_of, seeded

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dssgd.tasks"

# Built-in tasks, imported only when named (MNIST loading, scikit-learn stay out of other runs).
BUILTIN: dict[str, str] = {
    "mnist-mlp": "shared.builtin_tasks:MNIST_MLP",
    "mnist-cnn": "shared.builtin_tasks:MNIST_CNN",
    "breast-cancer": "shared.builtin_tasks:BREAST_CANCER",
}
# --model of earlier versions: the two paper models are the two MNIST tasks.
MODEL_ALIASES = {"mlp": "mnist-mlp", "cnn": "mnist-cnn"}


class TaskError(plugins.PluginError):
    """A task cannot be found or does not keep its contract (a user mistake, one line)."""


@dataclass(frozen=True)
class TaskContext:
    """What ``local_data(ctx)`` is told about the participant it loads data for."""

    participant: int
    participants: int
    seed: int
    data_dir: Path | None = None  # the --data DIR this worker was given, or None
    partition: str = "iid"  # the run's partitioner (shared/partition.py)
    shard_size: int | None = None  # examples per participant the run asks for (None: N-th)
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, dataset: Dataset, size: int | None = None) -> Subset:
        """This participant's part of ``dataset`` under the run's partitioner (seeded)."""
        total = len(dataset)  # type: ignore[arg-type]
        size = size or self.shard_size or total // self.participants
        size = max(1, min(size, total))
        labels = class_targets(dataset) if self.partition != "iid" else None
        idx = partition.indices(
            self.partition, labels, total, self.participant, self.participants, size, self.seed
        )
        return Subset(dataset, idx.tolist())


@runtime_checkable
class TaskProtocol(Protocol):
    """The contract, for type checkers: a duck-typed object with these methods is a task."""

    def build_model(self) -> nn.Module: ...

    def local_data(self, ctx: TaskContext) -> Dataset: ...

    def test_data(self) -> Dataset | None: ...


class Task:
    """Optional base class: documents the contract and supplies the defaults."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def local_data(self, ctx: TaskContext) -> Dataset:
        raise NotImplementedError

    def test_data(self) -> Dataset | None:
        return None

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def metrics(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        return default_metrics(model, dataset, self.loss)


# --- datasets as tensors ------------------------------------------------------------------------


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a dataset, stacked (local data is held in memory, as MNIST's is)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        x, y = as_tensors(dataset.dataset)
        idx = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        return x[idx], y[idx]
    pairs = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    xs = torch.stack([torch.as_tensor(x) for x, _ in pairs])
    ys = [torch.as_tensor(y) for _, y in pairs]
    return xs, torch.stack(ys)


def class_targets(dataset: Dataset) -> np.ndarray:
    """Integer class labels of a dataset (what label-skew partitioners need)."""
    targets = getattr(dataset, "targets", None)
    y = torch.as_tensor(targets) if targets is not None else as_tensors(dataset)[1]
    if y.is_floating_point() or y.ndim != 1:
        raise TaskError("this partition needs a dataset whose targets are class numbers")
    return y.numpy().astype(np.int64)


@torch.no_grad()
def default_metrics(
    model: nn.Module, dataset: Dataset, loss: Callable[..., torch.Tensor]
) -> dict[str, float]:
    """Accuracy (classification targets) and mean loss, in batches of 2000."""
    x, y = as_tensors(dataset)
    model.eval()
    total, correct = 0.0, 0
    for start in range(0, len(x), 2000):
        out, target = model(x[start : start + 2000]), y[start : start + 2000]
        total += float(loss(out, target)) * len(target)
        if not target.is_floating_point() and out.ndim == 2:
            correct += int((out.argmax(1) == target).sum())
    n = max(1, len(x))
    classify = not y.is_floating_point()
    return {"accuracy": correct / n if classify else float("nan"), "loss": total / n}


def holdout(
    dataset: Dataset, seed: int, participant: int, fraction: float = 0.2
) -> tuple[Subset, Subset]:
    """(train, held out): a seeded ``fraction`` of a participant's data kept for evaluation."""
    n = len(dataset)  # type: ignore[arg-type]
    k = max(1, round(fraction * n)) if n > 1 else 0
    perm = np.random.default_rng([seed, participant, 6]).permutation(n).tolist()
    return Subset(dataset, perm[k:]), Subset(dataset, perm[:k])


# --- finding a task -----------------------------------------------------------------------------


def registered_names() -> list[str]:
    """Built-in task names and those registered under the ``dssgd.tasks`` entry-point group."""
    return sorted({*BUILTIN, *plugins.entry_point_names(ENTRY_POINT_GROUP)})


def resolve(spec: str) -> Any:
    """The object a task spec names (not yet checked)."""
    spec = MODEL_ALIASES.get(spec, spec)
    if spec in BUILTIN:
        spec = BUILTIN[spec]
    if not plugins.is_spec(spec):
        found = plugins.entry_point(ENTRY_POINT_GROUP, spec)
        if found is None:
            if spec.endswith(".py"):
                raise TaskError(f"name the task object in the file: --task {spec}:NAME")
            raise TaskError(
                f"unknown model or task {spec!r}; give FILE.py:NAME, package.module:NAME or "
                f"one of {', '.join(registered_names())}"
            )
        return found
    try:
        return plugins.load_object(spec)
    except plugins.PluginError as exc:
        raise TaskError(f"task {spec}: {exc}") from exc


# --- a checked task -----------------------------------------------------------------------------


def _call(spec: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call the user's code; whatever it raises comes back as one TaskError line."""
    try:
        return fn(*args)
    except TaskError:
        raise
    except Exception as exc:
        log.debug("task %s: %s failed", spec, what, exc_info=True)
        raise TaskError(f"task {spec}: {what} failed: {type(exc).__name__}: {exc}") from exc


def _check_dataset(spec: str, what: str, ds: Any) -> Dataset:
    if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
        raise TaskError(
            f"task {spec}: {what} returned {type(ds).__name__}, not a Dataset of "
            "(input, target) pairs (it needs __len__ and __getitem__)"
        )
    if len(ds) == 0:
        raise TaskError(f"task {spec}: {what} returned an empty dataset")
    first = _call(spec, f"{what}[0]", ds.__getitem__, 0)
    if not (isinstance(first, tuple | list) and len(first) == 2):
        raise TaskError(f"task {spec}: {what}[0] is {type(first).__name__}, not (input, target)")
    return ds  # type: ignore[no-any-return]


@dataclass(frozen=True, eq=False)
class LoadedTask:
    """A task found and checked, with dssgd's defaults filled in."""

    spec: str
    obj: Any

    def build_model(self, seed: int | None = None) -> nn.Module:
        model = _call(self.spec, "build_model()", seeded, self.obj.build_model, seed)
        if not isinstance(model, nn.Module):
            raise TaskError(
                f"task {self.spec}: build_model() returned {type(model).__name__}, "
                "not a torch.nn.Module"
            )
        return model

    @functools.cached_property
    def layout(self) -> StateLayout:
        return layout_of(self.build_model(0))

    def initial_state(self, seed: int) -> np.ndarray:
        return get_flat(self.build_model(seed))

    def local_data(self, ctx: TaskContext) -> Dataset:
        ds = _call(self.spec, "local_data(ctx)", self.obj.local_data, ctx)
        return _check_dataset(self.spec, "local_data(ctx)", ds)

    def test_data(self, ctx: TaskContext | None = None) -> Dataset | None:
        fn = getattr(self.obj, "test_data", None)
        if fn is None:
            return None
        # Built-in tasks take the context (where MNIST lives); a user's takes nothing.
        args = (ctx,) if ctx is not None and _takes_argument(fn) else ()
        ds = _call(self.spec, "test_data()", fn, *args)
        return None if ds is None else _check_dataset(self.spec, "test_data()", ds)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fn = getattr(self.obj, "loss", None)
        return F.cross_entropy(output, target) if fn is None else fn(output, target)

    def metrics(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        fn = getattr(self.obj, "metrics", None)
        if fn is None:
            return default_metrics(model, dataset, self.loss)
        out = _call(self.spec, "metrics(model, dataset)", fn, model, dataset)
        if not isinstance(out, dict):
            raise TaskError(f"task {self.spec}: metrics() returned {type(out).__name__}, not dict")
        return {str(k): float(v) for k, v in out.items()}

    @functools.cached_property
    def has_test_data(self) -> bool:
        """Whether the aggregator can evaluate centrally (else participants evaluate)."""
        known = getattr(self.obj, "has_test_data", None)
        if isinstance(known, bool):
            return known
        return self.test_data() is not None

    def describe(self) -> str:
        """The model's tensor names, shapes and dtypes as JSON (stored with the run)."""
        return json.dumps(self.layout.describe(), separators=(",", ":"))


def _takes_argument(fn: Callable[..., Any]) -> bool:
    try:
        return len(inspect.signature(fn).parameters) >= 1
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=32)
def load_task(spec: str) -> LoadedTask:
    """Find a task by its spec and check its shape (cached: every caller sees one object)."""
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError("unknown model or task: the task spec is empty")
    obj = plugins.instance(resolve(spec.strip()), spec)
    missing = [m for m in ("build_model", "local_data") if not callable(getattr(obj, m, None))]
    if missing:
        raise TaskError(f"task {spec} lacks {' and '.join(f'{m}()' for m in missing)}")
    return LoadedTask(spec, obj)


def canonical(spec: str) -> str:
    """The spec as the run stores it (``mlp`` → ``mnist-mlp``)."""
    return MODEL_ALIASES.get(spec, spec)


# --- the run's side: contexts, the model record, refusing a different model ---------------------


def context_for(cfg: Any, participant: int, data_dir: Path | None = None) -> TaskContext:
    """The context of one participant of a run (``cfg`` a RunConfig); ``--data`` wins."""
    if data_dir is None and cfg.data not in ("auto", "hub"):
        data_dir = Path(cfg.data)
    return TaskContext(
        participant=participant,
        participants=cfg.participants,
        seed=cfg.seed,
        data_dir=data_dir,
        partition=cfg.partition_spec,
        shard_size=cfg.shard_size,
    )


def model_record(task: LoadedTask) -> str:
    """What the run stores about its model: the task spec and its tensors' fingerprint."""
    described = task.layout.describe()
    return json.dumps(
        {"task": task.spec, "fingerprint": fingerprint_of(described), "tensors": described},
        separators=(",", ":"),
    )


def check_layout(layout: StateLayout, record: str, run_id: str, what: str) -> None:
    """Refuse to join a run whose model differs, naming the first tensor that differs."""
    try:
        stored = json.loads(record)
        theirs = stored["tensors"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TaskError(f"run {run_id!r} has an unreadable model record: {exc}") from exc
    diff = first_difference(layout.describe(), theirs)
    if diff is not None:
        raise TaskError(
            f"{what}'s model differs from run {run_id!r}'s ({stored.get('task')}): {diff}"
        )


def check_model(task: LoadedTask, record: str, run_id: str) -> None:
    check_layout(task.layout, record, run_id, f"task {task.spec}")


def param_entries(cfg: Any, n: int) -> int:
    """How many of a run's n state entries are parameters (the rest are buffers sent whole)."""
    return n - buffer_entries(cfg.task) if cfg.buffers == "whole" else n


@functools.lru_cache(maxsize=32)
def buffer_entries(spec: str) -> int:
    """Flat-state entries after the parameters (buffers), for the run's checks of an update."""
    return load_task(spec).layout.n_buffers


def central_test(cfg: Any) -> tuple[LoadedTask, nn.Module, Dataset | None]:
    """(task, a model to load states into, the central test set or None) of a run."""
    task = load_task(cfg.task)
    data_dir = None if cfg.data in ("auto", "hub") else Path(cfg.data)
    ctx = TaskContext(-1, cfg.participants, cfg.seed, data_dir, cfg.partition_spec)
    return task, task.build_model(), task.test_data(ctx)


def evaluate_state(cfg: Any, w: np.ndarray) -> dict[str, float] | None:
    """The task's metrics of a flat global state on the central test set (None: there is none)."""
    task, model, test = central_test(cfg)
    if test is None:
        return None
    from shared.models import set_flat

    set_flat(model, np.array(w, dtype=np.float32))
    with torch.inference_mode():
        return task.metrics(model, test)


def preflight(cfg: Any) -> LoadedTask:
    """Find and check a run's task before any service starts (a bad task fails in one line)."""
    from shared.rules import update_rule
    from shared.selection import selection_rule

    selection_rule(cfg.selection)  # user rules (pkg.mod:Name) are found now, not mid-run
    update_rule(cfg.effective_rule)
    task = load_task(cfg.task)
    check_coding(task, cfg)
    central_test(cfg)  # also warms MNIST's cache for the workers
    return task


def check_coding(task: LoadedTask, cfg: Any) -> None:
    """q8 scales a message by its largest value: buffers sent whole would drown the parameters."""
    if task.layout.n_buffers and cfg.buffers == "whole" and cfg.value_coding == "q8":
        raise TaskError(
            f"task {task.spec}'s model has buffers ({task.layout.slots[-1].name!r}), which "
            "travel whole: use --value-coding f32 or f16, not q8"
        )


def check_size(task: LoadedTask, n: int, run_id: str) -> None:
    """For a run without a model record: at least the state sizes must agree."""
    if task.layout.n != n:
        raise TaskError(
            f"task {task.spec}'s model has {task.layout.n} state entries, run {run_id!r} has {n}"
        )
