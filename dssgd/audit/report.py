"""The audit's outputs: a terminal table, a JSON document and a PNG grid of reconstructions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dssgd.audit import membership
from dssgd.audit.sweep import Audit, Controls, PointResult

COLUMNS = (
    "setting",
    "sent",
    "recovered",
    "best cos",
    "never-seen",
    "MIA AUC [95% CI]",
    "TPR@1%",
    "TPR@0.1%",
    "labels",
    "verdict",
)


def _f(v: float, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def strongest(r: PointResult) -> membership.Membership | None:
    """The membership score with the highest AUC at this point (the attacker picks it)."""
    scored = [v for v in r.membership.values() if not isinstance(v, str)]
    return max(scored, key=lambda m: m.auc.value) if scored else None


def _labels_cell(r: PointResult) -> str:
    lab = r.labels
    if not lab.applicable:
        return "n/a"
    got = "{" + ",".join(map(str, lab.inferred)) + "}"
    return f"{got} {'exact' if lab.exact else 'wrong'}"


def row(r: PointResult) -> list[str]:
    rec = r.reconstruction
    if r.not_applicable:
        return [
            r.point.label,
            "–",
            "n/a",
            "–",
            "–",
            "–",
            "–",
            "–",
            "n/a",
            "n/a: " + r.not_applicable,
        ]
    mia = strongest(r)
    recovered = f"{rec.recovered}/{rec.members}" if rec.applicable else "n/a"
    return [
        r.point.label,
        f"{r.entries}",
        recovered,
        _f(rec.best_cosine) if rec.applicable else "–",
        _f(rec.control) if rec.applicable else "–",
        f"{mia.auc} {mia.score[:4]}" if mia else "–",
        f"{100 * mia.tpr[0.01].value:.1f}%" if mia else "–",
        f"{100 * mia.tpr[0.001].value:.1f}%" if mia else "–",
        _labels_cell(r),
        r.verdict,
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _control_lines(c: Controls) -> list[str]:
    rec = c.reconstruction
    if rec.applicable:
        ok = "ok" if c.reconstruction_ok else "FAILED: the attack has no power here"
        recon = f"cosine {rec.best_cosine:.4f} (never-seen {rec.control:.3f}) {ok}"
    else:
        recon = f"n/a ({rec.reason})"
    ranks = ", ".join(f"{k} {100 * v:.1f}%" for k, v in c.membership_percentile.items())
    lab = c.label
    label = (
        f"{{{','.join(map(str, lab.truth))}}} → {{{','.join(map(str, lab.inferred))}}}"
        f" {'ok' if lab.exact else 'FAILED'}"
        if lab.applicable
        else f"n/a ({lab.reason})"
    )
    return [
        f"  {c.state}: reconstruction {recon}; the member outranks non-members: {ranks}; "
        f"label {label}",
    ]


def text(audit: Audit) -> str:
    """The whole terminal report: setting, positive controls, table, self-tests, notes."""
    s, scn = audit.setting, audit.scenario
    acc = ", ".join(f"{k} {v:.3f}" for k, v in scn.accuracy.items())
    out = [
        f"dssgd audit: task {s.task}, {len(scn.members)} records of participant 0, "
        f"{len(scn.non_members)} non-members, lr {s.lr:g}, batch {s.batch_size}, "
        f"γ default {s.gamma:g}, {s.value_coding} on the wire",
        f"model states: accuracy on non-members {acc}",
        "",
        "positive controls (a one-example update, dense, through the wire):",
    ]
    for c in audit.controls.values():
        out += _control_lines(c)
    first = next(iter(audit.controls.values()), None)
    if first is not None:
        cv = first.curious
        out.append(
            f"curious participant ({cv.mode}): two consecutive downloads differ from the "
            f"server's view by at most {cv.max_abs_difference:.2g}: it sees what the server sees"
        )
    out += ["", _table([list(COLUMNS)] + [row(r) for r in audit.results]), ""]
    for t in audit.selftests:
        out.append(
            f"DP self-test {t.mechanism} (shared/dpaudit.py, 99%): empirical ε ≥ "
            f"{t.shipped.epsilon_lb:.3f} vs claim {t.claimed:g} "
            f"({'holds' if t.holds else 'VIOLATED'}); broken control ε ≥ "
            f"{t.broken.epsilon_lb:.2f} ({'test has power' if t.has_power else 'NO POWER'})"
        )
    out += _bound_lines(audit)
    reasons = [r.reconstruction.reason for r in audit.results if not r.reconstruction.applicable]
    reasons += [f"label set: {r.labels.reason}" for r in audit.results if not r.labels.applicable]
    for note in [*audit.notes, *dict.fromkeys(f"n/a: {x}" for x in reasons if x)]:
        out.append(f"note: {note}")
    out.append(
        f"recovered = cosine > 0.9 and above the never-seen control; MIA = the stronger of "
        f"loss drop / gradient alignment; chance is AUC 0.5, TPR = FPR. {audit.seconds:.1f} s"
    )
    return "\n".join(out)


def _bound_lines(audit: Audit) -> list[str]:
    """Each DP-SGD point's measured membership figures beside what its guarantee allows."""
    out = []
    for r in audit.results:
        b, m = r.dp_bound, strongest(r)
        if b is None or m is None:
            continue
        tpr = m.tpr[0.01]
        if r.above_dp_bound:
            where = "ABOVE the bound"
        elif m.auc.value <= b.auc and tpr.value <= b.tpr[0.01]:
            where = "within it"
        else:
            where = "consistent with it (its interval reaches below the bound)"
        parts = r.by_draws.get(m.score, {})
        split = "; ".join(f"{p} {x.members}: AUC {x.auc.value:.3f}" for p, x in parts.items())
        out.append(
            f"DP bound {r.point.label} ({audit.setting.run_epochs}-epoch run): {b}; measured "
            f"{m.score} AUC {m.auc.value:.3f}, TPR@1% {tpr.value:.1%}: {where}"
            + (f" (members {split})" if split else "")
        )
    return out


# --- JSON -------------------------------------------------------------------------------------


def _point_json(r: PointResult) -> dict[str, Any]:
    p = r.point
    return {
        "label": p.label,
        "state": p.state,
        "theta_u": p.theta_u,
        "selection": p.selection,
        "gamma": p.gamma,
        "dp": p.dp,
        "epsilon": p.eps,
        "dpsgd_noise_multiplier": r.sigma,
        "not_applicable": r.not_applicable or None,
        "entries_sent": r.entries,
        "wire_bytes": r.wire_bytes,
        "reconstruction": r.reconstruction.summary(),
        "membership": {
            k: (v if isinstance(v, str) else v.as_dict()) for k, v in r.membership.items()
        },
        "null_membership": {k: v.as_dict() for k, v in r.null_membership.items()},
        "dp_bound": r.dp_bound.as_dict() if r.dp_bound else None,
        "above_dp_bound": r.above_dp_bound,
        "membership_by_draws": {
            k: {part: m.as_dict() for part, m in v.items()} for k, v in r.by_draws.items()
        },
        "labels": r.labels.summary(),
        "leaks": r.verdicts,
        "verdict": r.verdict,
        "seconds": round(r.seconds, 2),
    }


def as_json(audit: Audit) -> dict[str, Any]:
    s, scn = audit.setting, audit.scenario
    return {
        "setting": {k: getattr(s, k) for k in s.__dataclass_fields__},
        "members": len(scn.members),
        "non_members": len(scn.non_members),
        "state_accuracy": scn.accuracy,
        "positive_controls": {
            k: {
                "reconstruction": c.reconstruction.summary(),
                "membership_percentile": c.membership_percentile,
                "label": c.label.summary(),
                "curious_participant_max_difference": c.curious.max_abs_difference,
            }
            for k, c in audit.controls.items()
        },
        "points": [_point_json(r) for r in audit.results],
        "dp_selftests": [t.summary() for t in audit.selftests],
        "notes": audit.notes,
        "seconds": round(audit.seconds, 2),
    }


def write_json(audit: Audit, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(as_json(audit), indent=2, ensure_ascii=False) + "\n")
    return out


# --- PNG --------------------------------------------------------------------------------------


def _as_image(v: np.ndarray) -> np.ndarray:
    side = round(math.sqrt(v.size))
    return v.reshape(side, side) if side * side == v.size else v.reshape(1, -1)


def write_png(audit: Audit, out: Path, per_row: int = 3) -> Path:
    """Each applicable point: its best-reconstructed members, true record beside reconstruction."""
    from dssgd.plot import _new_figure, _save

    rows = [
        r for r in audit.results if r.reconstruction.applicable and r.reconstruction.images.size
    ]
    if not rows:
        raise ValueError("no point has a reconstruction to draw")
    members = audit.scenario.members.x.reshape(len(audit.scenario.members), -1).numpy()
    fig = _new_figure((2.0 * per_row * 1.25 + 2.6, 1.25 * len(rows) + 0.4))
    grid = fig.add_gridspec(len(rows), 2 * per_row)
    for i, r in enumerate(rows):
        rec = r.reconstruction
        for j, (m, cos) in enumerate(rec.top(per_row)):
            for k, (img, title) in enumerate(
                ((members[m], f"member {m}"), (rec.images[rec.best_candidate[m]], f"cos {cos:.3f}"))
            ):
                ax = fig.add_subplot(grid[i, 2 * j + k])
                ax.imshow(_as_image(img), cmap="gray", aspect="auto" if img.size < 64 else "equal")
                ax.set_xticks([])
                ax.set_yticks([])
                ok = cos > max(0.9, rec.control)
                ax.set_title(title, fontsize=7, color="red" if k and ok else "black")
                if j == 0 and k == 0:
                    ax.set_ylabel(
                        f"{r.point.label}\nnever-seen {rec.control:.2f}",
                        fontsize=6,
                        rotation=0,
                        ha="right",
                        va="center",
                    )
    fig.suptitle(
        f"dssgd audit, {audit.setting.task}: true record (left) beside its best first-layer "
        "reconstruction (red: recovered)",
        fontsize=9,
    )
    return _save(fig, Path(out))
