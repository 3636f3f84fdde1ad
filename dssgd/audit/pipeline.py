"""One participant's update as the server receives it, through the project's own code.

Local epoch (shared/training.py LocalTrainer, or shared/dpsgd.py DpSgdTrainer with σ from
shared/accounting.py, as the worker derives it) → Δw → selection and clipping
(shared/selection.py select_state) or the sparse vector technique (shared/privacy.py
svt_select) → wire.encode → wire.decode. What comes out of the decoder is exactly what the
aggregator, and so a curious server, holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dssgd.audit.scenario import Records, Scenario
from dssgd.shared import wire
from dssgd.shared.errors import ConfigError
from dssgd.shared.models import get_flat
from dssgd.shared.privacy import SvtParams, epsilon_for, noise_rng, svt_select
from dssgd.shared.rules import UpdateRule, apply_update
from dssgd.shared.selection import budget, select_state, selection_rule
from dssgd.shared.training import LocalTrainer

DP_MECHANISMS = ("none", "svt", "dpsgd")


@dataclass(frozen=True)
class Point:
    """One setting of the sweep: what the participant shares, from which model state."""

    state: str = "trained"  # "initial" or "trained"
    theta_u: float = 1.0
    selection: str = "topk"
    gamma: float | None = None  # None: the run's default lr/4
    dp: str = "none"  # none | svt | dpsgd
    eps: float | None = None  # svt: ε/c (the paper's axis); dpsgd: total ε of the run

    def check(self) -> None:
        if self.state not in ("initial", "trained"):
            raise ConfigError(f"model state must be initial or trained, got {self.state!r}")
        if not (0.0 < self.theta_u <= 1.0):
            raise ConfigError(f"--theta-u must be in (0, 1], got {self.theta_u:g}")
        if self.gamma is not None and not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"--gamma must be > 0, got {self.gamma:g}")
        if self.dp not in DP_MECHANISMS:
            raise ConfigError(f"unknown DP mechanism {self.dp!r}; choose none, svt:EPS, dpsgd:EPS")
        if self.dp != "none" and not (self.eps and self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(f"DP {self.dp} needs an ε > 0 (e.g. {self.dp}:1)")
        selection_rule(self.selection)  # an unknown rule fails here, in one line

    @property
    def label(self) -> str:
        parts = [self.state, f"θu {self.theta_u:g}"]
        if self.selection != "topk":
            parts.append(self.selection)
        if self.gamma is not None:
            parts.append(f"γ {self.gamma:g}")
        if self.dp == "svt":
            parts.append(f"SVT ε/c {self.eps:g}")
        elif self.dp == "dpsgd":
            parts.append(f"DP-SGD ε {self.eps:g}")
        return ", ".join(parts)


@dataclass
class ServerView:
    """A decoded update and the state it was computed from."""

    base: np.ndarray  # the global state the participant downloaded
    indices: np.ndarray
    values: np.ndarray
    n: int
    wire_bytes: int
    sigma: float | None = None  # DP-SGD noise multiplier, when used
    # DP-SGD: how often Poisson sampling drew each record in the epoch (the audit's ground truth,
    # never part of what the server sees)
    times_sampled: np.ndarray | None = None

    def dense(self) -> np.ndarray:
        out = np.zeros(self.n, dtype=np.float32)
        out[self.indices] = self.values
        return out


def local_epoch(
    scn: Scenario, point: Point, data: Records, base: np.ndarray
) -> tuple[np.ndarray, float | None, np.ndarray | None]:
    """Δw of one local epoch from ``base``; with DP-SGD, its σ and each record's draws."""
    s = scn.setting
    model = scn.model(base)
    if point.dp == "dpsgd":
        # Imported here: dp-accounting and torch.func are not needed without DP-SGD.
        from dssgd.shared.accounting import noise_multiplier
        from dssgd.shared.dpsgd import DpSgdTrainer

        q = min(1.0, s.batch_size / len(data))
        steps = -(-len(data) // s.batch_size)
        assert point.eps is not None
        sigma = noise_multiplier(point.eps, s.dp_delta, q, steps * s.run_epochs)
        gen = None if s.noise_seed is None else torch.Generator().manual_seed(s.noise_seed)
        trainer = DpSgdTrainer(
            model, data.x, data.y, s.lr, s.batch_size, s.dp_clip, sigma, scn.task.loss, gen
        )
        trainer.epoch()
        return get_flat(model) - base, sigma, trainer.times_sampled.numpy()
    LocalTrainer(model, data.x, data.y, s.lr, s.batch_size, s.seed, loss=scn.task.loss).epoch()
    return get_flat(model) - base, None, None


def share(scn: Scenario, point: Point, delta: np.ndarray, base: np.ndarray) -> ServerView:
    """Select/clip (or SVT) Δw, then encode and decode it as the run's wire does."""
    s = scn.setting
    gamma = point.gamma if point.gamma is not None else s.gamma
    tau = gamma / 10  # the run's default τ (RunConfig.effective_tau)
    n_params = scn.layout.n_params
    rng = np.random.default_rng(s.seed)
    if point.dp == "svt":
        assert point.eps is not None
        c = budget(delta.size, point.theta_u)
        params = SvtParams(epsilon=epsilon_for(point.eps, c), c=c, gamma=gamma, tau=tau)
        noise = noise_rng() if s.noise_seed is None else np.random.default_rng(s.noise_seed)
        indices, values = svt_select(delta, params, noise)
    else:
        indices, values = select_state(
            delta, n_params, point.theta_u, gamma, point.selection, tau, rng
        )
    return through_wire(base, indices, values, gamma, s.value_coding)


def through_wire(
    base: np.ndarray, indices: np.ndarray, values: np.ndarray, gamma: float | None, coding: str
) -> ServerView:
    n = base.size
    update = wire.Update("audit", 0, 1, 0, n, indices.astype(np.int64), values.astype(np.float32))
    body = wire.encode(update, values=coding, rng=np.random.default_rng(0), bound=gamma)
    got = wire.decode(body, expected_run="audit", expected_n=n)
    return ServerView(base, got.indices, got.values, n, len(body))


def server_view(scn: Scenario, point: Point, data: Records | None = None) -> ServerView:
    """The server's view of the audited (or given) participant's update at ``point``."""
    base = scn.states[point.state]
    delta, sigma, drawn = local_epoch(scn, point, data if data is not None else scn.members, base)
    view = share(scn, point, delta, base)
    view.sigma, view.times_sampled = sigma, drawn
    return view


def one_example_view(scn: Scenario, state: str, i: int = 0) -> ServerView:
    """Positive control: one SGD step on one member, dense and unclipped, through the wire."""
    base = scn.states[state]
    model = scn.model(base)
    x, y = scn.members.x[i : i + 1], scn.members.y[i : i + 1]
    LocalTrainer(model, x, y, scn.setting.lr, 1, 0, loss=scn.task.loss).epoch()
    delta = get_flat(model) - base
    return through_wire(base, np.arange(delta.size), delta, None, "f32")


@dataclass(frozen=True)
class CuriousView:
    mode: str
    max_abs_difference: float  # |(download after) − (download before) − server's update|
    entries: int


def curious_participant(scn: Scenario, view: ServerView, rule: str = "staleness") -> CuriousView:
    """What another participant sees in an ordered mode: two consecutive downloads.

    Round-robin and random order apply one participant's update per turn, with staleness 0
    (each turn downloads the state the previous turn left), so the difference of the global
    state read before and after one turn is that participant's update, weighted by the run's
    rule. Computed with the aggregator's own apply_update on a copy of the global state.
    """
    w = view.base.copy()
    before = w.copy()  # download at the start of the audited participant's turn
    stat = np.zeros(w.size, dtype=np.float32)
    apply_update(w, stat, view.indices, view.values, UpdateRule(rule).weight(0))
    seen = w - before  # download at the start of the next turn, minus the one before
    diff = float(np.abs(seen - view.dense()).max()) if w.size else 0.0
    return CuriousView("round-robin / random order", diff, int(np.count_nonzero(seen)))


def per_example_loss(scn: Scenario, state: np.ndarray, data: Records) -> torch.Tensor:
    """Each record's loss under ``state`` (the task's loss, one record at a time, batched)."""
    model = scn.model(state)
    model.eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(data), 1000):
            logits = model(data.x[start : start + 1000])
            target = data.y[start : start + 1000]
            try:
                out.append(torch.func.vmap(_one_loss(scn))(logits, target))
            except (RuntimeError, NotImplementedError, ValueError):
                pairs = zip(logits, target, strict=True)
                out.append(torch.stack([_one_loss(scn)(o, t) for o, t in pairs]))
    return torch.cat(out)


def _one_loss(scn: Scenario):  # type: ignore[no-untyped-def]
    return lambda o, t: scn.task.loss(o.unsqueeze(0), t.unsqueeze(0))


def loss_drop(scn: Scenario, view: ServerView, data: Records) -> np.ndarray:
    """L(w) − L(w + Δ) per record: how much the shared update lowered each record's loss."""
    after = view.base + view.dense()
    drop = per_example_loss(scn, view.base, data) - per_example_loss(scn, after, data)
    return drop.numpy().astype(np.float64)


def alignment(scn: Scenario, view: ServerView, data: Records) -> np.ndarray | str:
    """−cos(∇L(w; x), Δ) per record over the parameters, or why it cannot be computed.

    ⟨∇L_i, Δ⟩ for every record at once is one forward-mode product (torch.func.jvp); the norms
    ‖∇L_i‖ depend on the state only, so they are computed once per state and kept.
    """
    from torch.func import functional_call, jvp, vmap

    norms = gradient_norms(scn, view.base, data)
    if isinstance(norms, str):
        return norms
    model = scn.model(view.base)
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    slots = {s.name: s for s in scn.layout.slots}
    dense = view.dense()
    tangent = {k: torch.from_numpy(dense[_slice(slots[k])]).view_as(p) for k, p in params.items()}
    d_norm = float(torch.sqrt(sum(t.pow(2).sum() for t in tangent.values()))) or 1.0
    one = _one_loss(scn)
    out = []
    for start in range(0, len(data), 1000):
        x, y = data.x[start : start + 1000], data.y[start : start + 1000]

        def losses(p: dict[str, torch.Tensor], x: torch.Tensor = x, y: torch.Tensor = y):  # type: ignore[no-untyped-def]
            return vmap(one)(functional_call(model, (p, buffers), (x,)), y)

        try:
            _, dot = jvp(losses, (params,), (tangent,))
        except (RuntimeError, NotImplementedError) as exc:
            return f"gradient alignment needs forward-mode AD of the model: {_first_line(exc)}"
        out.append(dot)
    dots = torch.cat(out).double()
    return (-dots / (norms.double().clamp_min(1e-30) * d_norm)).numpy()


def gradient_norms(scn: Scenario, base: np.ndarray, data: Records) -> torch.Tensor | str:
    """‖∇L(w; x)‖ per record, cached per state and record set.

    A model made of nn.Linear layers gets them exactly from one batched backward pass
    (‖∇W_i‖² = ‖a_i‖²·‖g_i‖² for input a_i and output gradient g_i: Goodfellow's trick, 50×
    faster than materialising 5,000 gradients); any other model through DP-SGD's own
    per-record gradients (shared/dpsgd.py).
    """
    from dssgd.shared.dpsgd import DpSgdTrainer, DpSgdUnsupported

    key = (hash(base.tobytes()), id(data.x), len(data))
    if key in scn.cache:
        return scn.cache[key]  # type: ignore[no-any-return]
    model = scn.model(base)
    result: torch.Tensor | str
    try:
        if _linear_only(model):
            result = torch.cat(
                [
                    _linear_norms(scn, model, data.x[i : i + 1000], data.y[i : i + 1000])
                    for i in range(0, len(data), 1000)
                ]
            )
        else:
            trainer = DpSgdTrainer(model, data.x, data.y, 1.0, 1, 1.0, 0.0, loss=scn.task.loss)
            norms = []
            for i in range(0, len(data), 250):
                g = trainer.per_example_grads(data.x[i : i + 250], data.y[i : i + 250])
                norms.append(torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values())))
            result = torch.cat(norms)
    except DpSgdUnsupported as exc:
        result = str(exc)
    scn.cache[key] = result
    return result


def _linear_only(model: nn.Module) -> bool:
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return bool(owners) and all(type(m) is nn.Linear for m in owners)


def _linear_norms(
    scn: Scenario, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Per-record gradient norms of an all-Linear model from one backward pass of Σ_i L_i."""
    from dssgd.shared.dpsgd import DpSgdUnsupported

    acts: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    grads: dict[int, torch.Tensor] = {}

    def keep(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if inp[0].ndim != 2:
            raise DpSgdUnsupported("a Linear layer sees more than one vector per record")
        slot = len(acts)
        acts.append((mod, inp[0].detach(), out))  # type: ignore[arg-type]
        out.register_hook(lambda g: grads.__setitem__(slot, g.detach()))

    hooks = [m.register_forward_hook(keep) for m in model.modules() if type(m) is nn.Linear]
    try:
        model.eval()
        out = model(x)
        torch.func.vmap(_one_loss(scn))(out, y).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    total = torch.zeros(len(x), dtype=torch.float64)
    for slot, (mod, a, _) in enumerate(acts):
        g = grads[slot].double()
        g2 = g.pow(2).sum(1)
        if mod.weight.requires_grad:
            total += a.double().pow(2).sum(1) * g2
        if mod.bias is not None and mod.bias.requires_grad:
            total += g2
    return total.sqrt()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _slice(slot) -> slice:  # type: ignore[no-untyped-def]
    return slice(slot.offset, slot.offset + slot.numel)
