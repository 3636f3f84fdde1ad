"""Tasks, partitioners, the named flat state and plug-in rules: pure, no servers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dssgd.shared import partition
from dssgd.shared.errors import ConfigError
from dssgd.shared.models import first_difference, get_flat, layout_of, set_flat, state_dict_of
from dssgd.shared.rules import UpdateRule, update_weight
from dssgd.shared.selection import select, select_state
from dssgd.shared.tasks import TaskContext, TaskError, check_model, load_task, model_record
from torch import nn


class BnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


# --- the flat state ------------------------------------------------------------------------------


def test_layout_puts_parameters_first_then_buffers_by_name() -> None:
    layout = layout_of(BnNet())
    names = [s.name for s in layout.slots]
    assert names == ["fc.weight", "fc.bias", "bn.weight", "bn.bias", "out.weight", "out.bias",
                     "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]  # fmt: skip
    assert layout.n_params == 12 + 4 + 8 + 10 and layout.n_buffers == 4 + 4 + 1
    assert layout.slots[-1].dtype == "int64" and layout.slots[-1].buffer


def test_flat_state_round_trips_buffers_exactly() -> None:
    src, dst = BnNet(), BnNet()
    src.train()
    for _ in range(3):
        src(40 + torch.randn(8, 3))  # moves the running statistics and the counter
    flat = get_flat(src)
    set_flat(dst, flat)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert int(dst.bn.num_batches_tracked) == 3
    state = state_dict_of(BnNet(), flat)
    assert (
        list(state) == list(src.state_dict())
        and state["bn.num_batches_tracked"].dtype == torch.int64
    )


def test_first_difference_names_the_tensor() -> None:
    a = layout_of(BnNet()).describe()
    b = layout_of(nn.Sequential(nn.Linear(3, 5))).describe()
    assert "'fc.weight'" in (first_difference(a, b) or "")
    assert first_difference(a, a) is None
    assert "exists only here" in (first_difference(a, a[:-1]) or "")


def test_select_state_sends_buffers_whole_and_unclipped() -> None:
    delta = np.array([0.5, -0.01, 0.02, 30.0, 7.0], dtype=np.float32)  # 3 parameters, 2 buffers
    idx, vals = select_state(delta, 3, theta_u=0.3, gamma=0.1)
    assert idx.tolist() == [0, 3, 4]
    assert vals.tolist() == pytest.approx([0.1, 30.0, 7.0])
    idx, _ = select_state(delta, 3, theta_u=0.3, gamma=0.1, send_buffers=False)
    assert idx.tolist() == [0]


# --- finding tasks -------------------------------------------------------------------------------

GOOD = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

class T:
    def build_model(self):
        return nn.Linear(2, 2)
    def local_data(self, ctx):
        return TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))

TASK = T()
BadModel = type("BadModel", (T,), {"build_model": lambda self: 42})
BadData = type("BadData", (T,), {"local_data": lambda self, ctx: 42})
NotPairs = type("NotPairs", (T,), {"local_data": lambda self, ctx: [1, 2, 3]})
Raises = type("Raises", (T,), {"local_data": lambda self, ctx: 1 / 0})
"""


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "mytask.py"
    path.write_text(GOOD)
    return path


def test_a_duck_typed_file_loads_and_classes_are_instantiated(task_file: Path) -> None:
    task = load_task(f"{task_file}:TASK")
    assert isinstance(task.build_model(1), nn.Linear)
    assert len(task.local_data(TaskContext(0, 1, 1))) == 4
    assert task.test_data() is None and not task.has_test_data
    assert load_task(f"{task_file}:BadData").obj.__class__.__name__ == "BadData"


@pytest.mark.parametrize(
    ("suffix", "needle"),
    [
        (":NOPE", "has no 'NOPE'"),
        (":BadModel", "not a torch.nn.Module"),
        (":BadData", "not a Dataset"),
        (":Raises", "ZeroDivisionError"),
        (":NotPairs", "not \\(input, target\\)"),
    ],
)
def test_bad_tasks_give_one_clear_line(task_file: Path, suffix: str, needle: str) -> None:
    with pytest.raises(TaskError, match=needle) as info:
        task = load_task(f"{task_file}{suffix}")
        task.build_model(1)
        task.local_data(TaskContext(0, 1, 1))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope", "unknown model or task"),
        ("/does/not/exist.py:T", "does not exist"),
        ("mytask.py", "name the task object"),
        ("no_such_module_xyz:T", "cannot import"),
        ("os:path", "lacks build_model"),
    ],
)
def test_tasks_that_cannot_be_found(spec: str, needle: str) -> None:
    with pytest.raises(TaskError, match=needle):
        load_task(spec)


def test_model_alias_and_builtins() -> None:
    assert load_task("mlp").layout.n == load_task("mnist-mlp").layout.n == 109_386
    assert load_task("dssgd.shared.builtin_tasks:MNIST_CNN").layout.n == 105_506


def test_a_differing_model_is_refused_by_tensor_name(task_file: Path) -> None:
    record = model_record(load_task("mnist-mlp"))
    assert json.loads(record)["task"] == "mnist-mlp"
    check_model(load_task("mlp"), record, "r")
    with pytest.raises(TaskError, match=r"'weight'.*'fc1\.weight'"):
        check_model(load_task(f"{task_file}:TASK"), record, "r")


# --- partitioners --------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 100)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "classes:2", "quantity:1"])
def test_partitions_are_deterministic_and_in_range(spec: str) -> None:
    parts = [partition.indices(spec, LABELS, 1000, p, 5, 100, seed=3) for p in range(5)]
    again = [partition.indices(spec, LABELS, 1000, p, 5, 100, seed=3) for p in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert all(p.size and p.min() >= 0 and p.max() < 1000 for p in parts)


def test_k_classes_gives_k_classes_and_disjoint_parts() -> None:
    parts = [partition.indices("classes:2", LABELS, 1000, p, 5, 100, seed=1) for p in range(5)]
    assert all(np.unique(LABELS[p]).size == 2 for p in parts)
    flat = np.concatenate(parts)
    assert np.unique(flat).size == flat.size


def test_quantity_skew_gives_unequal_disjoint_parts() -> None:
    parts = [partition.indices("quantity:0.3", LABELS, 1000, p, 5, 100, seed=1) for p in range(5)]
    sizes = [p.size for p in parts]
    assert max(sizes) > 2 * min(sizes) and sum(sizes) <= 500
    flat = np.concatenate(parts)
    assert np.unique(flat).size == flat.size


@pytest.mark.parametrize("spec", ["nope", "iid:1", "dirichlet", "classes:1.5", "quantity:-1"])
def test_bad_partition_specs(spec: str) -> None:
    with pytest.raises(ConfigError):
        partition.parse(spec)


def test_context_split_uses_the_runs_partitioner() -> None:
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.zeros(1000, 1), torch.from_numpy(LABELS))
    part = TaskContext(1, 5, 1, partition="classes:1").split(ds)
    assert torch.unique(ds.tensors[1][part.indices]).numel() == 1


# --- rules by name -------------------------------------------------------------------------------

RULES = """
import numpy as np

class Every:
    help = "every entry"
    def select(self, delta, k, tau, rng):
        return np.arange(min(k, delta.size))

class Half:
    help = "half weight"
    def weight(self, staleness, exponent, n_participants):
        return 0.5
"""


def test_user_rules_resolve_by_spec(tmp_path: Path) -> None:
    path = tmp_path / "myrules.py"
    path.write_text(RULES)
    delta = np.arange(10, dtype=np.float32)
    assert select(delta, 0.3, f"{path}:Every").tolist() == [0, 1, 2]
    assert update_weight(f"{path}:Half", 3) == 0.5
    assert UpdateRule(f"{path}:Half").weight(9) == 0.5
    with pytest.raises(ValueError, match="unknown update rule"):
        UpdateRule("median")


def test_a_task_registered_as_an_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ep_task_mod.py").write_text(GOOD)
    info = tmp_path / "ep_task_dist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-task-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dssgd.tasks]\nmy-ep-task = ep_task_mod:TASK\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = load_task("my-ep-task")
    assert isinstance(task.build_model(), nn.Linear)
    from dssgd.shared.tasks import registered_names

    assert "my-ep-task" in registered_names()


def test_configurations_stored_by_earlier_versions_still_load() -> None:
    from dssgd.shared.config import RunConfig

    old = RunConfig().to_json()
    raw = {k: v for k, v in json.loads(old).items() if k not in ("task", "partition", "buffers")}
    raw["model"] = "cnn"
    cfg = RunConfig.from_json(json.dumps(raw))
    assert (cfg.task, cfg.model, cfg.partition_spec) == ("mnist-cnn", "cnn", "iid")
    assert RunConfig(task="x.py:T").model == "x.py:T"
    assert RunConfig(model="cnn").replace(task="mnist-mlp").model == "mlp"


def test_a_bad_task_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from testing.runs import ROOT

    res = subprocess.run(
        [sys.executable, "-m", "dssgd", "run", "--task", f"{tmp_path}/missing.py:TASK"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr, res.stderr


def test_federated_point_is_the_example_weighted_mean() -> None:
    from dssgd.aggregator.evaluator import federated_point

    progress = {
        0: {"fed_version": "4", "fed_examples": "10", "fed_accuracy": "1.0", "fed_loss": "0.1"},
        1: {"fed_version": "6", "fed_examples": "30", "fed_accuracy": "0.5", "fed_loss": "0.5"},
        2: {"epochs": "3"},  # not reported yet
    }
    point = federated_point(progress)
    assert point is not None
    assert point["accuracy"] == pytest.approx(0.625) and point["loss"] == pytest.approx(0.4)
    assert (point["version"], point["reporting"], point["source"]) == (6, 2, "federated")
    assert federated_point({2: {"epochs": "3"}}) is None


def test_q8_is_refused_for_a_model_with_buffers(tmp_path: Path) -> None:
    from dssgd.shared.config import RunConfig
    from dssgd.shared.tasks import check_coding

    (tmp_path / "bn.py").write_text(
        "from torch import nn\n"
        "class T:\n"
        "    def build_model(self):\n"
        "        return nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))\n"
        "    def local_data(self, ctx):\n"
        "        return None\n"
        "TASK = T()\n"
    )
    task = load_task(f"{tmp_path}/bn.py:TASK")
    with pytest.raises(TaskError, match="not q8"):
        check_coding(task, RunConfig(value_coding="q8"))
    check_coding(task, RunConfig(value_coding="f16"))
    check_coding(task, RunConfig(value_coding="q8", buffers="local"))
    check_coding(load_task("mnist-mlp"), RunConfig(value_coding="q8"))


def test_the_l2_bound_leaves_buffers_alone() -> None:
    from dssgd.shared.rules import bound_l2

    values = np.array([3.0, 4.0, 500.0], dtype=np.float32)  # two parameters, one buffer
    out, scaled = bound_l2(values, 1.0, np.array([True, True, False]))
    assert scaled and out.tolist() == pytest.approx([0.6, 0.8, 500.0])
    out, scaled = bound_l2(values, 1.0)  # without the mask the buffer would crush the step
    assert scaled and out[0] < 0.01
