"""The sweep: every attack on the update of each setting, with controls and a verdict.

``DEFAULT_POINTS`` vary one lever at a time from "the server sees everything" (θu = 1): the
shared fraction θu, the selection rule, the bound γ, the DP mechanism and its ε, and the model
state (initial, trained). The default sweep of mnist-mlp runs in under two minutes on two cores
(docs/AUDIT.md). Positive controls (a one-example update) run once per model state: they do not
depend on what the participant shares, only on whether the attack has power on this model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dssgd.audit import dpbound, dpcheck, labels, membership, pipeline, reconstruct
from dssgd.audit.pipeline import Point
from dssgd.audit.scenario import Scenario, Setting, load

log = logging.getLogger(__name__)

_T, _I = "trained", "initial"
DEFAULT_POINTS: tuple[Point, ...] = (
    Point(_T, 1.0),
    Point(_T, 0.1),
    Point(_T, 0.01),
    Point(_T, 0.1, "threshold"),
    Point(_T, 1.0, gamma=0.001),
    Point(_T, 1.0, dp="svt", eps=100.0),
    Point(_T, 1.0, dp="svt", eps=1.0),
    Point(_T, 1.0, dp="dpsgd", eps=8.0),
    Point(_T, 1.0, dp="dpsgd", eps=1.0),
    Point(_I, 1.0),
    Point(_I, 1.0, dp="svt", eps=1.0),
    Point(_I, 1.0, dp="dpsgd", eps=8.0),
)
ByDraws = dict[str, dict[str, membership.Membership]]  # score → part of the members → figures
SELFTEST_EPSILON = 2.0  # where a test of a few thousand samples can still flag a broken mechanism


@dataclass
class PointResult:
    point: Point
    reconstruction: reconstruct.Reconstruction
    membership: dict[str, membership.Membership | str]
    labels: labels.LabelSet
    wire_bytes: int
    entries: int
    sigma: float | None
    seconds: float
    not_applicable: str = ""  # the whole point cannot run (e.g. DP with buffers)
    null_membership: dict[str, membership.Membership] = field(default_factory=dict)
    dp_bound: dpbound.AttackBound | None = None  # DP-SGD: the most any attack can reach
    by_draws: ByDraws = field(default_factory=dict)  # DP-SGD: score → never drawn / drawn

    @property
    def above_dp_bound(self) -> list[str]:
        """Scores whose figures exceed what the DP guarantee allows (must stay empty).

        An AUC or TPR interval lying wholly above its bound would mean the update is not what
        the accountant assumes.
        """
        b = self.dp_bound
        if b is None:
            return []
        return [
            k
            for k, v in self.membership.items()
            if not isinstance(v, str)
            and (v.auc.low > b.auc or any(v.tpr[f].low > t for f, t in b.tpr.items()))
        ]

    @property
    def verdicts(self) -> list[str]:
        """What leaks at this point, in words (empty: nothing the attacks could show)."""
        out = []
        if self.reconstruction.recovered:
            out.append(f"{self.reconstruction.recovered} records recovered")
        mia = [
            k for k, v in self.membership.items() if not isinstance(v, str) and membership.leaks(v)
        ]
        if mia:
            out.append("membership (" + ", ".join(mia) + ")")
        if self.labels.beats_guess:
            out.append("label set")
        if self.above_dp_bound:
            out.append("ABOVE THE DP BOUND (" + ", ".join(self.above_dp_bound) + ")")
        return out

    @property
    def verdict(self) -> str:
        if self.not_applicable:
            return "n/a"
        v = self.verdicts
        return "LEAKS: " + "; ".join(v) if v else "no leak shown"


@dataclass
class Controls:
    """Positive controls of one model state: the attacks on a one-example update."""

    state: str
    reconstruction: reconstruct.Reconstruction
    membership_percentile: dict[str, float]  # the one member's rank among non-members
    label: labels.LabelSet
    curious: pipeline.CuriousView

    @property
    def reconstruction_ok(self) -> bool:
        return not self.reconstruction.applicable or self.reconstruction.best_cosine >= 0.999


@dataclass
class Audit:
    setting: Setting
    scenario: Scenario
    controls: dict[str, Controls]
    results: list[PointResult]
    selftests: list[dpcheck.SelfTest]
    seconds: float
    notes: list[str] = field(default_factory=list)


def _example(scn: Scenario) -> Any:
    return scn.members.x[:2]


def _scores(scn: Scenario, view: pipeline.ServerView) -> dict[str, tuple[Any, Any]]:
    """Each membership score of members and of non-members (or why it cannot be computed)."""
    out: dict[str, tuple[Any, Any]] = {
        "loss drop": (
            pipeline.loss_drop(scn, view, scn.members),
            pipeline.loss_drop(scn, view, scn.non_members),
        ),
    }
    out["gradient alignment"] = (
        pipeline.alignment(scn, view, scn.members),
        pipeline.alignment(scn, view, scn.non_members),
    )
    return out


def _membership(
    scn: Scenario, view: pipeline.ServerView
) -> tuple[dict[str, membership.Membership | str], dict[str, membership.Membership], ByDraws]:
    """The attack (members vs non-members), its null control (non-members vs non-members)
    and, under DP-SGD, the attack on the members Poisson sampling never drew vs those it drew.

    The null control scores the first |members| non-members as if they were members: its AUC
    must sit at 0.5, or the scores tell apart something other than membership. A member never
    drawn took no part in the update: it must score like a non-member too, or something other
    than the clipped, noised gradients of the drawn records reached the update.
    """
    s = scn.setting
    attack: dict[str, membership.Membership | str] = {}
    null: dict[str, membership.Membership] = {}
    by_draws: ByDraws = {}
    k = min(len(scn.members), len(scn.non_members) // 2)
    ym, yu = scn.members.y.numpy(), scn.non_members.y.numpy()
    per_class = not scn.members.y.is_floating_point() and len(np.unique(yu)) <= 1000
    for name, (m, u) in _scores(scn, view).items():
        if isinstance(m, str) or isinstance(u, str):
            attack[name] = m if isinstance(m, str) else str(u)
            continue
        m_null, u_null = u[:k], u[k:]
        if per_class:
            m, u, m_null, u_null = (
                membership.calibrate(m, ym, u, yu),
                membership.calibrate(u, yu, u, yu),
                membership.calibrate(m_null, yu[:k], u_null, yu[k:]),
                membership.calibrate(u_null, yu[k:], u_null, yu[k:]),
            )
        attack[name] = membership.evaluate(name, m, u, s.bootstrap, s.seed)
        null[name] = membership.evaluate(name, m_null, u_null, s.bootstrap, s.seed)
        if view.times_sampled is not None:
            drawn = view.times_sampled > 0
            by_draws[name] = {
                part: membership.evaluate(name, m[sel], u, s.bootstrap, s.seed)
                for part, sel in (("never drawn", ~drawn), ("drawn", drawn))
                if sel.sum() >= 2
            }
    return attack, null, by_draws


def run_point(scn: Scenario, point: Point) -> PointResult:
    """Every attack on the server's view of the audited participant's update at ``point``."""
    t0 = time.perf_counter()
    if point.dp != "none" and scn.layout.n_buffers:
        reason = "DP needs a model without buffers (the worker refuses it too)"
        empty = reconstruct.Reconstruction(False, reason)
        return PointResult(
            point, empty, {}, labels.LabelSet(False, reason), 0, 0, None, 0.0, reason
        )
    model = scn.model()
    layer = reconstruct.find_first_layer(model, scn.layout, _example(scn))
    last = labels.find_last_layer(model, scn.layout, _example(scn))
    view = pipeline.server_view(scn, point)
    dense = view.dense()
    rec = reconstruct.attack(layer, dense, scn.members.x, scn.never_seen.x)
    mia, null, by_draws = _membership(scn, view)
    skew_view = pipeline.server_view(scn, point, scn.skewed)
    shared = np.zeros(view.n, dtype=bool)
    shared[skew_view.indices] = True
    lab = labels.infer(last, skew_view.dense(), shared, scn.skewed.y.numpy())
    bound = None
    if point.dp == "dpsgd" and view.sigma is not None:
        s = scn.setting
        n = len(scn.members)
        q, steps = min(1.0, s.batch_size / n), -(-n // s.batch_size)
        bound = dpbound.dpsgd_update_bound(view.sigma, q, steps, s.dp_delta, membership.FPRS)
    return PointResult(
        point,
        rec,
        mia,
        lab,
        view.wire_bytes,
        int(view.indices.size),
        view.sigma,
        time.perf_counter() - t0,
        null_membership=null,
        dp_bound=bound,
        by_draws=by_draws,
    )


def run_controls(scn: Scenario, state: str) -> Controls:
    model = scn.model()
    layer = reconstruct.find_first_layer(model, scn.layout, _example(scn))
    last = labels.find_last_layer(model, scn.layout, _example(scn))
    one = pipeline.one_example_view(scn, state, 0)
    rec = reconstruct.attack(layer, one.dense(), scn.members.x[:1], scn.never_seen.x)
    member = scn.members.take(1)
    drop_m = pipeline.loss_drop(scn, one, member)
    drop_u = pipeline.loss_drop(scn, one, scn.non_members)
    pct = {"loss drop": membership.percentile_of(float(drop_m[0]), drop_u)}
    al_m, al_u = pipeline.alignment(scn, one, member), pipeline.alignment(scn, one, scn.non_members)
    if not isinstance(al_m, str) and not isinstance(al_u, str):
        pct["gradient alignment"] = membership.percentile_of(float(al_m[0]), al_u)
    shared = np.ones(one.n, dtype=bool)
    lab = labels.infer(last, one.dense(), shared, member.y.numpy())
    typical = pipeline.server_view(scn, Point(state, 0.1))
    return Controls(state, rec, pct, lab, pipeline.curious_participant(scn, typical))


def selftests(points: list[Point], setting: Setting, samples: int) -> list[dpcheck.SelfTest]:
    out = []
    if any(p.dp == "svt" for p in points):
        out.append(dpcheck.svt_selftest(SELFTEST_EPSILON, setting.gamma, samples))
    if any(p.dp == "dpsgd" for p in points):
        # A DP-SGD step costs ~100× an SVT call; 1/10 of the samples still flags the broken
        # control at 2× its claim (measured: ε ≥ 4.3 at 400 samples).
        out.append(dpcheck.dpsgd_selftest(SELFTEST_EPSILON, setting.dp_delta, samples // 10))
    return out


def run(setting: Setting, points: list[Point], selftest_samples: int = 4000) -> Audit:
    """Load the scenario, run the positive controls, every point and the DP self-tests."""
    for p in points:
        p.check()
    threads = torch.get_num_threads()
    # One thread: the models are small, and on a shared machine torch's thread pool spinning
    # against other processes made one MLP step 20× slower (measured: 189 vs 9.6 ms).
    torch.set_num_threads(1)
    try:
        return _run(setting, points, selftest_samples)
    finally:
        torch.set_num_threads(threads)


def _run(setting: Setting, points: list[Point], selftest_samples: int) -> Audit:
    t0 = time.perf_counter()
    scn = load(setting)
    notes = list(scn.notes)
    kept = [p for p in points if p.state in scn.states]
    if len(kept) < len(points):
        notes.append("points on a model state this task cannot provide were skipped")
    controls = {state: run_controls(scn, state) for state in dict.fromkeys(p.state for p in kept)}
    results = []
    for p in kept:
        results.append(run_point(scn, p))
        log.info("%s: %s (%.1f s)", p.label, results[-1].verdict, results[-1].seconds)
    tests = selftests(kept, setting, selftest_samples) if selftest_samples else []
    return Audit(setting, scn, controls, results, tests, time.perf_counter() - t0, notes)
