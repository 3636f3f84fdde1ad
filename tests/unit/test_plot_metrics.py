"""Run plots (dssgd.plot) and the aggregator's Prometheus endpoint (aggregator.metrics).

Pure unit tests: no RabbitMQ or Redis. The HTTP test binds only a loopback port.
"""

from __future__ import annotations

import math
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dssgd.aggregator.metrics import AggregatorMetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dssgd.plot import DPI, FIGSIZE, plot_run, plot_series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which the PNG spec requires to come first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _points(n: int) -> list[dict[str, float]]:
    t0 = 1_700_000_000.0
    return [
        {
            "time": t0 + 2.0 * i,
            "elapsed": 2.0 * i + 0.5,
            "version": 40 * i,
            "applied": 40 * i,
            "bytes_in": 350_000 * i,
            "accuracy": 0.1 + 0.85 * (1 - math.exp(-i / 5)),
            "loss": 2.3 * math.exp(-i / 5),
        }
        for i in range(n)
    ]


# --- plots ---------------------------------------------------------------------------------------


def test_plot_run_writes_a_png_of_the_expected_size(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "dir" / "run.png"  # parents do not exist yet
    got = plot_run(_points(30), out, title="run abc123 · 30 participants · θ=0.1")
    assert got == out and out.is_file()
    assert out.stat().st_size > 10_000
    width, height = _png_size(out)
    assert abs(width - FIGSIZE[0] * DPI) <= 2 and abs(height - FIGSIZE[1] * DPI) <= 2
    assert abs(width - 13 * 110) <= 2 and abs(height - 4 * 110) <= 2
    # The atomic write leaves no temporary file behind.
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.png"]


def test_plot_run_without_elapsed_uses_time_since_first_point(tmp_path: Path) -> None:
    points = _points(5)
    for p in points:
        del p["elapsed"]
    out = plot_run(points, tmp_path / "old.png")
    assert _png_size(out)[0] > 0


def test_plot_run_rejects_no_points(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no metrics recorded yet"):
        plot_run([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_plot_run_with_one_point(tmp_path: Path) -> None:
    point = {
        "time": 1.0,
        "elapsed": 0.0,
        "version": 0,
        "applied": 0,
        "bytes_in": 0,
        "accuracy": 0.11,
        "loss": 2.3,
    }
    out = plot_run([point], tmp_path / "one.png")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_series_log_x_with_references(tmp_path: Path) -> None:
    series = {
        "θ=0.01": [(0.1, 0.80), (1.0, 0.90), (10.0, 0.95)],
        "θ=0.1": [(10.0, 0.97), (0.1, 0.85), (1.0, 0.93)],  # unsorted on purpose
        "no data yet": [],
    }
    out = plot_series(
        series,
        tmp_path / "sub" / "eps.png",
        xlabel="ε",
        ylabel="test accuracy",
        title="accuracy vs ε",
        logx=True,
        reference={"paper, θ=0.1": 0.98, "standalone": 0.89},
    )
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert out.stat().st_size > 10_000


def test_plot_series_refuses_nothing_and_nonpositive_log_x(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_series({"a": []}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="positive"):
        plot_series(
            {"a": [(0.0, 1.0), (1.0, 2.0)]}, tmp_path / "x.png", xlabel="x", ylabel="y", logx=True
        )


# --- Prometheus metrics ------------------------------------------------------------------------


def _samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name} {labels}: {found}"
    return found[0]


def _fill(m: AggregatorMetrics) -> None:
    m.observe_batch(
        applied=3,
        duplicates=1,
        rejected={"stale": 2},
        staleness=[0, 1, 5],
        bytes_in=1000,
        seconds=0.0007,
        version=3,
    )
    m.observe_batch(
        applied=2,
        duplicates=0,
        rejected={"stale": 1, "wrong-run": 1, "too-big": 0},
        staleness=[3, 300],
        bytes_in=500,
        seconds=0.3,
        version=5,
    )
    m.set_accuracy(0.91, 0.31)
    m.set_accuracy(0.93, 0.25)  # a gauge keeps the latest
    m.set_epsilon(0, 0.5)
    m.set_epsilon(7, 1.25)


def _check(samples: list[Sample], run: str) -> None:
    r = {"run": run}
    assert _value(samples, "dssgd_updates_applied_total", **r) == 5
    assert _value(samples, "dssgd_duplicates_total", **r) == 1
    assert _value(samples, "dssgd_updates_rejected_total", reason="stale", **r) == 3
    assert _value(samples, "dssgd_updates_rejected_total", reason="wrong-run", **r) == 1
    assert not [s for s in samples if s.labels.get("reason") == "too-big"]  # zero counts: no series
    assert _value(samples, "dssgd_bytes_in_total", **r) == 1500
    assert _value(samples, "dssgd_global_version", **r) == 5
    assert _value(samples, "dssgd_queue_batch_size", **r) == 2 + 0 + 2
    assert _value(samples, "dssgd_test_accuracy", **r) == pytest.approx(0.93)
    assert _value(samples, "dssgd_test_loss", **r) == pytest.approx(0.25)
    assert _value(samples, "dssgd_epsilon_spent", participant="0", **r) == 0.5
    assert _value(samples, "dssgd_epsilon_spent", participant="7", **r) == 1.25

    # Staleness observed: 0, 1, 5, 3, 300 (buckets are cumulative).
    expected = {
        "0.0": 1,
        "1.0": 2,
        "2.0": 2,
        "4.0": 3,
        "8.0": 4,
        "16.0": 4,
        "32.0": 4,
        "64.0": 4,
        "128.0": 4,
        "256.0": 4,
        "+Inf": 5,
    }
    buckets = {
        s.labels["le"]: s.value
        for s in samples
        if s.name == "dssgd_staleness_bucket" and s.labels["run"] == run
    }
    assert buckets == expected
    assert _value(samples, "dssgd_staleness_count", **r) == 5
    assert _value(samples, "dssgd_staleness_sum", **r) == 309

    apply = {
        s.labels["le"]: s.value
        for s in samples
        if s.name == "dssgd_apply_seconds_bucket" and s.labels["run"] == run
    }
    assert float(min(apply, key=lambda le: float(le))) == 0.0005
    assert float(max((le for le in apply if le != "+Inf"), key=float)) == 2.0
    assert apply["0.0005"] == 0 and apply["0.001"] == 1 and apply["0.25"] == 1
    assert apply["0.5"] == 2 and apply["+Inf"] == 2
    assert _value(samples, "dssgd_apply_seconds_sum", **r) == pytest.approx(0.3007)


def test_render_has_the_expected_samples() -> None:
    m = AggregatorMetrics("run-a")
    _fill(m)
    _check(_samples(m.render().decode()), "run-a")


def test_fresh_metrics_show_zeros_but_no_accuracy() -> None:
    samples = _samples(AggregatorMetrics("fresh").render().decode())
    assert _value(samples, "dssgd_updates_applied_total", run="fresh") == 0
    assert _value(samples, "dssgd_staleness_count", run="fresh") == 0
    assert not [s for s in samples if s.name in ("dssgd_test_accuracy", "dssgd_epsilon_spent")]


@pytest.fixture
def served() -> Iterator[AggregatorMetrics]:
    m = AggregatorMetrics("served")
    yield m
    m.close()


def test_serve_on_a_free_port(served: AggregatorMetrics) -> None:
    _fill(served)
    port = served.serve(0)
    assert 0 < port < 65536
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    _check(_samples(body), "served")
    with pytest.raises(RuntimeError):
        served.serve(0)
    served.close()
    served.close()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_two_instances_do_not_clash() -> None:
    a, b = AggregatorMetrics("run-a"), AggregatorMetrics("run-b")
    _fill(a)
    b.observe_batch(
        applied=7, duplicates=0, rejected={}, staleness=[], bytes_in=10, seconds=0.01, version=7
    )
    _check(_samples(a.render().decode()), "run-a")
    sb = _samples(b.render().decode())
    assert _value(sb, "dssgd_updates_applied_total", run="run-b") == 7
    assert not [s for s in sb if s.labels.get("run") == "run-a"]
    # Same run id twice is fine as well: the registries are separate.
    c = AggregatorMetrics("run-a")
    assert _value(_samples(c.render().decode()), "dssgd_updates_applied_total", run="run-a") == 0
