"""Tests of the small pure modules: config validation, update rules, the replay window, backoff.

Each is checked against hand-worked values and, where a property is cheap to state, against a
reference model driven by hypothesis.
"""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dssgd.shared import dedup
from dssgd.shared.config import Connections, RunConfig, env_overrides, from_mapping, load_toml
from dssgd.shared.errors import ConfigError
from dssgd.shared.lifecycle import Backoff, StopFlag
from dssgd.shared.rules import UpdateRule, apply_update, decay, update_weight
from hypothesis import given, settings
from hypothesis import strategies as st

# --- RunConfig ----------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    cfg = RunConfig()
    assert cfg.run_id == "default"
    assert cfg.model == "mlp"
    assert cfg.order == "async"
    assert cfg.effective_rule == "staleness"


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"theta_u": 0}, "theta_u"),
        ({"theta_u": 1.5}, "theta_u"),
        ({"theta_u": math.nan}, "theta_u"),
        ({"theta_d": 0.0}, "theta_d"),
        ({"theta_d": 2}, "theta_d"),
        ({"order": "x"}, "order"),
        ({"lr": -1}, "learning rate"),
        ({"lr": 0}, "learning rate"),
        ({"lr": math.inf}, "learning rate"),
        ({"lr": math.nan}, "learning rate"),
        ({"run_id": "has space"}, "run id"),
        ({"run_id": "-leading-dash"}, "run id"),
        ({"run_id": "_leading"}, "run id"),
        ({"run_id": ""}, "run id"),
        ({"run_id": "x" * 49}, "run id"),
        ({"run_id": "dots.not.allowed"}, "run id"),
        ({"model": "x"}, "model"),
        ({"participants": 0}, "participants"),
        ({"shard_size": 0}, "shard size"),
        ({"shard_size": 50_001}, "shard size"),
        ({"label_skew": 0.0}, "label skew"),
        ({"label_skew": -1.0}, "label skew"),
        ({"label_skew": math.nan}, "label skew"),
        ({"download": "all"}, "download"),
        ({"selection": "random"}, "selection"),
        ({"batch_size": 0}, "batch size"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": math.inf}, "gamma"),
        ({"tau": -0.1}, "tau"),
        ({"tau": math.nan}, "tau"),
        ({"rule": "x"}, "rule"),
        ({"staleness_exponent": -1.0}, "staleness exponent"),
        ({"stat_decay": 0.0}, "stat decay"),
        ({"stat_decay": 1.5}, "stat decay"),
        ({"value_coding": "f64"}, "value coding"),
        ({"epochs": -1}, "epochs"),
        ({"eval_interval": 0.0}, "eval interval"),
        ({"max_staleness": -1}, "max staleness"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_invalid_field_raises_naming_it(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        RunConfig(**changes)


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig(lr=-1, order="x", model="y")
    message = str(info.value)
    for needle in ("learning rate", "order", "model"):
        assert needle in message


@pytest.mark.parametrize(
    "changes",
    [
        {"run_id": "a"},
        {"run_id": "Run_1-b"},
        {"run_id": "9" * 48},
        {"theta_u": 1.0, "theta_d": 1e-6},
        {"tau": 0.0},
        {"stat_decay": 1.0},
        {"epochs": 0},
        {"max_staleness": 0},
        {"order": "round-robin", "rule": "mean", "value_coding": "q8", "model": "cnn"},
    ],
)
def test_boundary_values_are_valid(changes: dict[str, Any]) -> None:
    cfg = RunConfig(**changes)
    for key, value in changes.items():
        assert getattr(cfg, key) == value


def test_run_id_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(ConfigError, match="run id"):
        RunConfig(run_id="abc\n")


@pytest.mark.parametrize("name", ["staleness_exponent", "eval_interval"])
def test_nan_is_rejected_for_every_float_field(name: str) -> None:
    with pytest.raises(ConfigError):
        RunConfig(**{name: math.nan})


def test_effective_gamma_and_tau_defaults() -> None:
    cfg = RunConfig(lr=0.2)
    assert cfg.effective_gamma == pytest.approx(0.05)
    assert cfg.effective_tau == pytest.approx(0.005)
    cfg = RunConfig(lr=0.2, gamma=0.3)
    assert cfg.effective_gamma == 0.3
    assert cfg.effective_tau == pytest.approx(0.03)
    cfg = RunConfig(lr=0.2, gamma=0.3, tau=0.0)
    assert cfg.effective_tau == 0.0  # an explicit zero must not fall back to γ/10


@pytest.mark.parametrize(
    ("order", "rule", "expected"),
    [
        ("async", "auto", "staleness"),
        ("round-robin", "auto", "sum"),
        ("random", "auto", "sum"),
        ("async", "sum", "sum"),
        ("async", "mean", "mean"),
        ("round-robin", "staleness", "staleness"),
    ],
)
def test_effective_rule(order: str, rule: str, expected: str) -> None:
    cfg = RunConfig(order=order, rule=rule)
    assert cfg.effective_rule == expected
    assert cfg.ordered == (order != "async")


def test_json_round_trip() -> None:
    cfg = RunConfig(
        run_id="rt-1",
        model="cnn",
        participants=150,
        label_skew=0.3,
        theta_u=0.01,
        gamma=0.02,
        order="round-robin",
        rule="mean",
        max_staleness=5,
        created=1234.5,
        data="/tmp/x",
    )
    back = RunConfig.from_json(cfg.to_json())
    assert back == cfg
    assert back.created == 1234.5  # not part of ==, so checked on its own
    assert RunConfig.from_json(cfg.to_json().encode()) == cfg
    assert RunConfig.from_json(RunConfig().to_json()) == RunConfig()


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"lr": "fast"}', '{"colour": 1}'])
def test_from_json_rejects_bad_input(text: str) -> None:
    with pytest.raises(ConfigError):
        RunConfig.from_json(text)


def test_from_mapping_lists_unknown_keys() -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(RunConfig, {"lr": 0.1, "zeta": 1, "alpha": 2}, "test.toml")
    message = str(info.value)
    assert "alpha, zeta" in message
    assert "test.toml" in message


def test_from_mapping_coerces_environment_strings() -> None:
    cfg = from_mapping(
        RunConfig,
        {
            "theta_u": "0.5",
            "participants": "20",
            "label_skew": "none",
            "gamma": "",
            "tau": "None",
            "max_staleness": "none",
            "epochs": 3.0,
            "run_id": "env-run",
        },
        "environment",
    )
    assert cfg.theta_u == 0.5
    assert cfg.participants == 20
    assert isinstance(cfg.participants, int)
    assert cfg.label_skew is None
    assert cfg.gamma is None
    assert cfg.tau is None
    assert cfg.max_staleness is None
    assert cfg.epochs == 3
    assert cfg.run_id == "env-run"


@pytest.mark.parametrize(
    "raw",
    [
        {"lr": "fast"},
        {"participants": "2.5"},
        {"participants": 2.5},
        {"lr": None},
        {"theta_u": "1.5"},
        {"epochs": "none"},
    ],
)
def test_from_mapping_rejects_bad_values(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        from_mapping(RunConfig, raw, "environment")


def test_from_mapping_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match="table"):
        from_mapping(RunConfig, ["lr"], "x")  # type: ignore[arg-type]


def test_env_overrides_feed_from_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSSGD_THETA_U", "0.25")
    monkeypatch.setenv("DSSGD_LABEL_SKEW", "none")
    monkeypatch.setenv("DSSGD_ORDER", "random")
    monkeypatch.delenv("DSSGD_LR", raising=False)
    raw = env_overrides(RunConfig)
    assert raw["theta_u"] == "0.25"
    assert "lr" not in raw
    cfg = from_mapping(RunConfig, raw, "environment")
    assert (cfg.theta_u, cfg.label_skew, cfg.order) == (0.25, None, "random")


def test_load_toml_top_level(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('lr = 0.5\nmodel = "cnn"\ntheta-u = 0.2\n\n[other]\nx = 1\n')
    assert load_toml(path) == {"lr": 0.5, "model": "cnn", "theta_u": 0.2}


def test_load_toml_run_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[run]\nparticipants = 30\nlabel-skew = 0.5\n\n[connections]\nx = "y"\n')
    raw = load_toml(str(path))
    assert raw == {"participants": 30, "label_skew": 0.5}
    cfg = from_mapping(RunConfig, raw, str(path))
    assert (cfg.participants, cfg.label_skew) == (30, 0.5)


def test_load_toml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")


@pytest.mark.parametrize("text", ["lr = ", "[run\nlr = 1", "lr = 1\nlr = 2\n"])
def test_load_toml_bad_syntax(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="cannot read"):
        load_toml(path)


def test_load_toml_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_toml(tmp_path)


def test_load_toml_non_utf8_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"lr = 0.5\n# caf\xe9\n")
    with pytest.raises(ConfigError):
        load_toml(path)


def test_connections_defaults_and_secure_schemes() -> None:
    Connections()
    Connections(amqp_url="amqps://h:5671/%2F", redis_url="rediss://h:6380/1")


@pytest.mark.parametrize(
    ("amqp", "redis_url", "needle"),
    [
        ("http://h:5672/", "redis://h/0", "RabbitMQ"),
        ("redis://h/0", "redis://h/0", "RabbitMQ"),
        ("h:5672", "redis://h/0", "RabbitMQ"),
        ("amqp://h/", "http://h:6379", "Redis"),
        ("amqp://h/", "amqp://h/", "Redis"),
        ("amqp://h/", "", "Redis"),
    ],
)
def test_connections_reject_wrong_schemes(amqp: str, redis_url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Connections(amqp_url=amqp, redis_url=redis_url)


def test_connections_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSSGD_AMQP_URL", "amqp://u:p@rabbit:5672/%2F")
    monkeypatch.setenv("DSSGD_REDIS_URL", "redis://cache:6379/2")
    conn = Connections.from_env()
    assert conn.amqp_url == "amqp://u:p@rabbit:5672/%2F"
    assert conn.redis_url == "redis://cache:6379/2"
    assert Connections.from_env(redis_url="redis://x/0").redis_url == "redis://x/0"
    monkeypatch.setenv("DSSGD_REDIS_URL", "http://cache:6379")
    with pytest.raises(ConfigError):
        Connections.from_env()


# --- update rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("staleness", [0, 1, 7, 1000, -3])
def test_sum_weight_is_one(staleness: int) -> None:
    assert update_weight("sum", staleness, 2.0, 50) == 1.0


@pytest.mark.parametrize("n", [1, 4, 150])
def test_mean_weight_is_one_over_n(n: int) -> None:
    assert update_weight("mean", 3, 1.0, n) == pytest.approx(1.0 / n)


@pytest.mark.parametrize(
    ("staleness", "exponent", "expected"),
    [
        (0, 1.0, 1.0),
        (1, 1.0, 0.5),
        (3, 1.0, 0.25),
        (3, 0.5, 0.5),
        (9, 2.0, 0.01),
        (5, 0.0, 1.0),
        (-1, 1.0, 1.0),
        (-10, 2.0, 1.0),
    ],
)
def test_staleness_weight(staleness: int, exponent: float, expected: float) -> None:
    assert update_weight("staleness", staleness, exponent) == pytest.approx(expected)


def test_unknown_rule_raises() -> None:
    with pytest.raises(ValueError, match="unknown update rule"):
        update_weight("median", 0)
    with pytest.raises(ValueError):
        UpdateRule(name="median")


def test_update_rule_object() -> None:
    assert UpdateRule("staleness", exponent=1.0).weight(4) == pytest.approx(0.2)
    assert UpdateRule("mean", n_participants=8).weight(0) == pytest.approx(0.125)
    with pytest.raises(ValueError):
        UpdateRule("staleness", exponent=-1.0)
    with pytest.raises(ValueError):
        UpdateRule("mean", n_participants=0)


def test_apply_update_touches_only_given_indices() -> None:
    w = np.arange(10, dtype=np.float32)
    stat = np.zeros(10, dtype=np.float32)
    idx = np.array([1, 4, 8], dtype=np.int64)
    vals = np.array([2.0, -4.0, 0.5], dtype=np.float32)
    apply_update(w, stat, idx, vals, weight=0.5)
    expected = np.arange(10, dtype=np.float32)
    expected[idx] += np.float32(0.5) * vals
    np.testing.assert_array_equal(w, expected)
    np.testing.assert_array_equal(stat, [0, 1, 0, 0, 1, 0, 0, 0, 1, 0])
    apply_update(w, stat, idx[:1], vals[:1])
    assert stat[1] == 2
    assert w[1] == expected[1] + 2.0
    assert w.dtype == np.float32


@given(
    n=st.integers(1, 500),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 1e3, 1e7]),
)
def test_apply_update_integer_values_are_exact(n: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(n) * scale).astype(np.float32)
    k = int(rng.integers(0, n + 1))
    idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    vals = rng.integers(-3, 4, size=k).astype(np.float32)
    reference = w.astype(np.float64)
    reference[idx] += vals.astype(np.float64)
    apply_update(w, np.zeros(n, np.float32), idx, vals, 1.0)
    assert w.tobytes() == reference.astype(np.float32).tobytes()


def test_apply_update_integers_on_integers_stay_integers() -> None:
    w = np.zeros(1000, np.float32)
    stat = np.zeros(1000, np.float32)
    rng = np.random.default_rng(0)
    total = np.zeros(1000, np.int64)
    for _ in range(200):
        idx = np.sort(rng.choice(1000, size=50, replace=False)).astype(np.int64)
        vals = rng.integers(-3, 4, size=50)
        apply_update(w, stat, idx, vals.astype(np.float32))
        total[idx] += vals
    np.testing.assert_array_equal(w, total.astype(np.float32))
    assert stat.sum() == 200 * 50


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_decay_multiplies_stat(beta: float) -> None:
    stat = np.array([0.0, 1.0, 4.0, 10.0], dtype=np.float32)
    decay(stat, beta)
    assert stat.dtype == np.float32
    np.testing.assert_allclose(stat, np.array([0.0, 1.0, 4.0, 10.0]) * beta, rtol=1e-6)


def test_decay_of_one_is_a_no_op() -> None:
    stat = np.array([1.0, 3.0], dtype=np.float32)
    decay(stat, 1.0)
    np.testing.assert_array_equal(stat, [1.0, 3.0])


# --- replay window ------------------------------------------------------------------------------


def feed(seqs: list[int]) -> tuple[tuple[int, int], list[str]]:
    """Drive the window as the aggregator does: mark only what check calls NEW."""
    state = (0, 0)
    verdicts = []
    for s in seqs:
        v = dedup.check(state, s)
        verdicts.append(v)
        if v == dedup.NEW:
            state = dedup.mark(state, s)
    return state, verdicts


def test_window_walkthrough() -> None:
    state = (0, 0)
    assert dedup.check(state, 1) == dedup.NEW
    state = dedup.mark(state, 1)
    assert state == (1, 1)
    assert dedup.check(state, 1) == dedup.DUPLICATE
    state = dedup.mark(state, 3)
    assert state == (3, 0b101)
    assert dedup.check(state, 2) == dedup.NEW  # arrived out of order, never applied
    state = dedup.mark(state, 2)
    assert dedup.check(state, 2) == dedup.DUPLICATE
    assert dedup.check(state, 4) == dedup.NEW


def test_window_edge_is_too_old() -> None:
    assert dedup.WINDOW == 64
    state = dedup.mark((0, 0), 100)
    assert dedup.check(state, 100 - 63) == dedup.NEW
    assert dedup.check(state, 100 - 64) == dedup.TOO_OLD
    assert dedup.check(state, 1) == dedup.TOO_OLD
    state = dedup.mark(state, 37)
    assert dedup.check(state, 37) == dedup.DUPLICATE


def test_big_jump_clears_the_window() -> None:
    state = feed(list(range(1, 11)))[0]
    state = dedup.mark(state, 10 + 64)
    assert state == (74, 1)
    assert dedup.check(state, 10) == dedup.TOO_OLD
    assert dedup.check(state, 11) == dedup.NEW
    state = dedup.mark(dedup.mark((0, 0), 5), 6)
    assert state == (6, 0b11)


def reference_verdict(applied: set[int], high: int, seq: int) -> str:
    if seq > high:
        return dedup.NEW
    if high - seq >= dedup.WINDOW:
        return dedup.TOO_OLD
    return dedup.DUPLICATE if seq in applied else dedup.NEW


@settings(max_examples=60)
@given(
    order=st.lists(st.integers(1, 200), max_size=200).flatmap(
        lambda extra: st.permutations(list(range(1, 201)) + extra)
    )
)
def test_window_property(order: list[int]) -> None:
    state = (0, 0)
    applied: set[int] = set()
    high = 0
    new_count: dict[int, int] = {}
    for s in order:
        v = dedup.check(state, s)
        assert v == reference_verdict(applied, high, s)
        if v == dedup.NEW:
            new_count[s] = new_count.get(s, 0) + 1
            state = dedup.mark(state, s)
            applied.add(s)
            high = max(high, s)
        assert 0 <= state[1] < 1 << dedup.WINDOW
    assert max(new_count.values()) == 1
    assert state[0] == 200
    for s in set(order):
        expected = dedup.DUPLICATE if 200 - s < dedup.WINDOW else dedup.TOO_OLD
        assert dedup.check(state, s) == expected


@given(high=st.integers(0, 2**53), mask=st.integers(0, 2**64 - 1))
def test_state_encoding_round_trip(high: int, mask: int) -> None:
    text = dedup.encode_state((high, mask))
    assert dedup.decode_state(text) == (high, mask)
    assert dedup.decode_state(text.encode()) == (high, mask)


@pytest.mark.parametrize("empty", [None, "", b""])
def test_decode_empty_state(empty: str | bytes | None) -> None:
    assert dedup.decode_state(empty) == (0, 0)


# --- backoff and stop flag ----------------------------------------------------------------------


def ceilings(b: Backoff, count: int) -> list[float]:
    return [min(b.cap, b.initial * b.factor**i) for i in range(count)]


def test_backoff_grows_jittered_and_capped() -> None:
    b = Backoff(initial=0.1, cap=1.0, factor=2.0, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(40)]
    for delay, ceiling in zip(delays, ceilings(b, 40), strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 1.0
    assert delays[0] <= 0.1
    assert min(delays[10:]) >= 0.5  # at the cap the floor is cap/2
    assert len(set(delays[10:])) > 20  # jitter, not a fixed value


def test_backoff_is_reproducible_with_seeded_rng() -> None:
    a = Backoff(rng=random.Random(42))
    b = Backoff(rng=random.Random(42))
    assert [a.next_delay() for _ in range(10)] == [b.next_delay() for _ in range(10)]


def test_backoff_reset_restarts() -> None:
    b = Backoff(initial=0.2, cap=5.0, rng=random.Random(1))
    for _ in range(8):
        b.next_delay()
    assert b.attempt == 8
    b.reset()
    assert b.attempt == 0
    assert 0.1 <= b.next_delay() <= 0.2


def test_backoff_stays_capped_after_many_attempts() -> None:
    b = Backoff(initial=0.2, cap=5.0, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(2000)]
    assert all(2.5 <= d <= 5.0 for d in delays[10:])


def test_backoff_sleep_returns_early_when_stopped() -> None:
    flag = StopFlag()
    flag.set("test")
    b = Backoff(initial=10.0, cap=10.0)
    start = time.monotonic()
    assert b.sleep(flag) is False
    assert time.monotonic() - start < 1.0


def test_backoff_sleep_without_stop() -> None:
    b = Backoff(initial=0.002, cap=0.002)
    assert b.sleep() is True
    assert b.sleep(StopFlag()) is True
    assert b.attempt == 2


def test_stop_flag_set_and_wait() -> None:
    flag = StopFlag()
    assert not flag
    assert not flag.is_set()
    assert flag.wait(0.01) is False
    flag.set("first")
    flag.set("second")
    assert flag
    assert flag.reason == "first"
    assert flag.wait(0) is True


def test_stop_flag_wakes_a_waiter() -> None:
    flag = StopFlag()
    timer = threading.Timer(0.05, flag.set, args=("from thread",))
    timer.start()
    try:
        start = time.monotonic()
        assert flag.wait(5.0) is True
        assert time.monotonic() - start < 2.0
        assert flag.reason == "from thread"
    finally:
        timer.cancel()
