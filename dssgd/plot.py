"""PNG plots of a run's learning curves, for ``dssgd`` reports and the paper comparisons.

``plot_run`` draws the aggregator's metrics time series (the JSON points the evaluator pushes to
Redis) as test accuracy against three costs side by side: wall time, updates applied, and
megabytes received. ``plot_series`` is a general line plot for sweeps (accuracy against epochs,
against ε, against the fraction c shared), with optional horizontal reference lines for the
figures reported in the paper.

Everything renders with the Agg backend so it works on servers without a display.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

# Forced before anything can pull in pyplot: the CLI runs on headless machines, where an
# interactive default backend would fail or try to open windows.
matplotlib.use("Agg")

# No pyplot at all: see _new_figure. (ruff knows matplotlib.use may precede imports.)
from matplotlib.axes import Axes
from matplotlib.figure import Figure

FIGSIZE = (13.0, 4.0)
DPI = 110
# Reference lines sit in grey with distinct dash patterns so they never share a colour with the
# measured series drawn from the default colour cycle.
_REFERENCE_STYLES = ("--", ":", "-.", (0, (5, 2, 1, 2, 1, 2)))


def _new_figure(figsize: tuple[float, float]) -> Figure:
    # The object-oriented Figure, not pyplot.figure(): pyplot keeps every figure in a global
    # registry until closed (a leak in long-lived processes) and is not thread-safe, while a bare
    # Figure is garbage-collected like any object. Constrained layout keeps the pixel size exact,
    # unlike bbox_inches="tight".
    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target then rename, so a dashboard or browser polling the file never
    # reads a half-written PNG while a periodic refresh rewrites it.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# A gap between two evaluators of one run (a new aggregator process) shorter than this is time
# the run went on (an aggregator restarted within `dssgd run`) and is counted; a longer one is a
# pause between a stop and a `--resume`, left out and marked on the time axis.
RESTART_GAP = 30.0


def _elapsed(points: Sequence[Mapping[str, float]]) -> tuple[list[float], list[float]]:
    """(run time of each point, where a resume after a pause starts), never running backwards.

    Each aggregator process measures "elapsed" from its own start, so the series restarts at
    every aggregator restart and every resume: each such segment is laid after the previous
    one. Points written before the evaluator recorded "elapsed" only carry a timestamp.
    """
    xs: list[float] = []
    resumes: list[float] = []
    t0 = float(points[0].get("time", 0.0))
    offset, prev_e, prev_t = 0.0, 0.0, t0
    for p in points:
        t = float(p.get("time", t0))
        e = float(p["elapsed"]) if p.get("elapsed") is not None else t - t0
        if xs and e < prev_e:  # a new evaluator: an aggregator restart or a resume
            gap = max(0.0, (t - e) - prev_t)  # from the last point to the new one's start
            offset = xs[-1] + (gap if gap < RESTART_GAP else 0.0)
            if gap >= RESTART_GAP:
                resumes.append(offset)
        xs.append(offset + e)
        prev_e, prev_t = e, t
    return xs, resumes


def plot_run(points: Sequence[Mapping[str, float]], out: Path, title: str = "") -> Path:
    """Write test accuracy against wall time, updates applied and MB received as one PNG.

    ``points`` is the run's metrics time series, oldest first. ``title`` (run id and key
    settings) goes on top of the figure. Returns ``out``; raises ValueError without points.
    """
    if not points:
        raise ValueError("no metrics recorded yet")
    out = Path(out)
    accuracy = [float(p["accuracy"]) for p in points]
    # Older points may lack "applied"; the global version counts the same thing for a run that
    # started from scratch.
    applied = [float(p.get("applied", p.get("version", 0))) for p in points]
    megabytes = [float(p.get("bytes_in", 0)) / 1e6 for p in points]
    times, resumes = _elapsed(points)
    panels: list[tuple[list[float], str, str]] = [
        (times, "run time (s)", "accuracy over time"),
        (applied, "updates applied", "accuracy per update"),
        (megabytes, "MB received by the aggregator", "accuracy per traffic"),
    ]
    # A single evaluation has no line to draw: show it as a visible marker instead.
    marker, markersize = ("o", 6.0) if len(points) == 1 else (".", 4.0)
    final = accuracy[-1]

    fig = _new_figure(FIGSIZE)
    axes: list[Axes] = list(fig.subplots(1, 3, sharey=True))
    for ax, (xs, xlabel, subtitle) in zip(axes, panels, strict=True):
        # Unclipped so the first point, at x = 0 on the axis edge, shows a whole marker.
        ax.plot(
            xs,
            accuracy,
            linewidth=1.5,
            color="C0",
            marker=marker,
            markersize=markersize,
            clip_on=False,
            zorder=3,
        )
        ax.axhline(final, color="0.35", linestyle=":", linewidth=1.2, label=f"final {final:.4f}")
        ax.set_xlabel(xlabel)
        ax.set_title(subtitle, fontsize=10)
        ax.grid(True, alpha=0.35)
        ax.set_xlim(left=0)
        ax.legend(loc="lower right", fontsize=8)
    for i, x in enumerate(resumes):
        label = "resumed (pause left out)" if i == 0 else None
        axes[0].axvline(x, color="0.55", linestyle="--", linewidth=1.0, label=label)
    if resumes:
        axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("test accuracy")
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def plot_series(
    series: Mapping[str, Sequence[tuple[float, float]]],
    out: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    reference: Mapping[str, float] | None = None,
) -> Path:
    """Write a line plot with one marked line per label of ``series`` (label → [(x, y), ...]).

    ``logx`` puts x on a log scale (for ε or the fraction c shared); ``reference`` maps a label to
    a y value drawn as a labelled horizontal line (e.g. the accuracy the paper reports).
    Returns ``out``; raises ValueError when there is nothing to draw.
    """
    drawable = {label: sorted(pts) for label, pts in series.items() if pts}
    if not drawable:
        raise ValueError("no data points to plot")
    if logx:
        bad = [label for label, pts in drawable.items() if any(x <= 0 for x, _ in pts)]
        if bad:
            # matplotlib would silently drop these points; say so instead of drawing a lie.
            raise ValueError(f"log x-axis needs positive x values; not so for {', '.join(bad)}")
    out = Path(out)

    fig = _new_figure((7.0, 4.5))
    ax = fig.add_subplot()
    for label, pts in drawable.items():
        xs = [float(x) for x, _ in pts]
        ys = [float(y) for _, y in pts]
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5, label=label)
    for i, (label, y) in enumerate((reference or {}).items()):
        ax.axhline(
            float(y),
            color="0.4",
            linewidth=1.1,
            linestyle=_REFERENCE_STYLES[i % len(_REFERENCE_STYLES)],
            label=f"{label} ({float(y):g})",
        )
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both" if logx else "major", alpha=0.35)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, out)
