"""What `dssgd status` and the run plots say after a stop, a restart and a resume (no servers)."""

from __future__ import annotations

from dssgd.plot import RESTART_GAP, _elapsed
from dssgd.status import REPORT_FRESH, aggregator_state


def points(start: float, elapsed: list[float]) -> list[dict[str, float]]:
    """Evaluations of one aggregator process that started at `start` (unix time)."""
    return [{"time": start + e, "elapsed": e, "accuracy": 0.5} for e in elapsed]


def test_the_time_axis_never_runs_backwards_across_restarts_and_a_resume() -> None:
    first = points(1000.0, [1, 2, 3])
    restart = points(1000.0 + 3 + 1.5, [1, 2])  # killed, back 1.5 s later within the run
    resume = points(1000.0 + 3 + 1.5 + 2 + 3600, [1, 2])  # `--resume` an hour later
    series = first + restart + resume
    raw = [p["elapsed"] for p in series]
    assert raw != sorted(raw)  # what the plot drew before: the axis ran backwards twice
    xs, resumes = _elapsed(series)
    assert xs == [1, 2, 3, 5.5, 6.5, 7.5, 8.5]  # the restart's 1.5 s counted, the hour not
    assert resumes == [6.5]
    assert 1.5 < RESTART_GAP < 3600


def test_points_without_elapsed_count_from_the_first_one() -> None:
    xs, resumes = _elapsed([{"time": 10.0}, {"time": 12.5}, {"time": 13.0}])
    assert xs == [0.0, 2.5, 3.0] and resumes == []


def test_status_says_up_only_for_a_fresh_report() -> None:
    now = 5000.0
    assert aggregator_state(None, now) == "not running"
    assert aggregator_state({"time": now - 0.8}, now) == "up"
    # A killed aggregator's report lingers until it expires (15 s): not "up" any more.
    assert aggregator_state({"time": now - REPORT_FRESH - 7}, now) == "silent for 12 s"
