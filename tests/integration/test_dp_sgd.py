"""DP-SGD (shared.dpsgd) and its accounting (shared.accounting).

* per-example gradients from vmap equal the ones computed one record at a time;
* the noisy gradient without noise is exactly the mean of the clipped per-example gradients;
* a layer that mixes examples is refused in one line;
* the PLD figures agree with a second library (Microsoft's prv-accountant) and, for the pure-DP
  part of SVT, with the exact composition computed by hand (Kairouz–Oh–Viswanath);
* the mechanism self-test: one real DP-SGD step on neighbouring datasets stays within the ε the
  accountant claims, and the same step without clipping (the negative control) is flagged;
* through the real services, a participant over its DP-SGD budget stops publishing and says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import prv_accountant as prv
import pytest
import torch
import torch.nn.functional as F
from dssgd.shared.accounting import dpsgd_epsilon, noise_multiplier, svt_pld_epsilon
from dssgd.shared.data import prepare
from dssgd.shared.dpaudit import audit
from dssgd.shared.dpsgd import DpSgdTrainer, DpSgdUnsupported
from dssgd.shared.models import build_model
from dssgd.shared.privacy import PrivacyAccountant, epsilon_for
from dssgd.shared.selection import budget
from scipy.special import gammaln, logsumexp
from torch import nn

from testing.runs import RunHandle

DELTA = 1e-5


def _data(n: int, model: str) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return prepare(images, model), torch.from_numpy(rng.integers(0, 10, size=n))


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_per_example_gradients_match_one_by_one(model: str) -> None:
    m = build_model(model, 1)
    x, y = _data(5, model)
    t = DpSgdTrainer(m, x, y, lr=0.1, batch_size=5, clip=1.0, noise_multiplier=0.0)
    batched = t.per_example_grads(x, y)
    for i in range(len(x)):
        m.zero_grad()
        F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(batched[name][i], p.grad, rtol=1e-4, atol=1e-6)


def test_noiseless_gradient_is_the_mean_of_clipped_per_example_gradients() -> None:
    m = build_model("mlp", 1)
    x, y = _data(8, "mlp")
    clip = 0.05  # well below the per-example norms, so every gradient is clipped
    t = DpSgdTrainer(m, x, y, lr=0.1, batch_size=4, clip=clip, noise_multiplier=0.0)
    got = t.noisy_gradient(torch.arange(8))
    want = {k: torch.zeros_like(p) for k, p in m.named_parameters()}
    for i in range(8):
        m.zero_grad()
        F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.parameters()))
        assert norm > clip
        for k, p in m.named_parameters():
            want[k] += p.grad * (clip / norm) / 4.0  # divided by the batch size B = 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7)


def test_batch_norm_is_refused_in_one_line() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    x, y = _data(4, "mlp")
    with pytest.raises(DpSgdUnsupported) as exc:
        DpSgdTrainer(model, x, y, lr=0.1, batch_size=2, clip=1.0, noise_multiplier=1.0)
    assert "BatchNorm1d" in str(exc.value) and "\n" not in str(exc.value)


# --- accounting against a second library and by hand ------------------------------------------


def test_dpsgd_epsilon_matches_prv_accountant() -> None:
    """The default DP-SGD configuration: 600 records, batch 32, 30 epochs (570 steps), ε = 8."""
    q, steps = 32 / 600, 19 * 30
    sigma = noise_multiplier(8.0, DELTA, q, steps)
    ours = dpsgd_epsilon(sigma, q, steps, DELTA)
    acc = prv.PRVAccountant(
        prvs=[prv.PoissonSubsampledGaussianMechanism(q, sigma)],
        max_self_compositions=[steps],
        eps_error=0.02,
        delta_error=1e-9,
    )
    lo, _, hi = acc.compute_epsilon(DELTA, [steps])
    assert lo - 0.02 <= ours <= hi + 0.05  # ours is pessimistic (rounded up): never far below
    assert ours <= 8.0


def kov_delta(eps0: float, k: int, eps: float) -> float:
    """Exact δ(ε) of k-fold composition of ε0-DP (Kairouz, Oh, Viswanath 2015, Thm 3.3)."""
    i = np.arange(k + 1)
    log_binom = gammaln(k + 1) - gammaln(i + 1) - gammaln(k - i + 1)
    a, b = (k - i) * eps0, eps + i * eps0
    m = a > b
    if not m.any():
        return 0.0
    terms = log_binom[m] + a[m] + np.log1p(-np.exp(b[m] - a[m]))
    return math.exp(logsumexp(terms) - k * math.log1p(math.exp(eps0)))


def test_svt_pld_default_configuration_is_checked_by_a_second_library() -> None:
    """Default task (MLP, θu 0.1, c = 10,939) at ε/c = 0.01, one epoch: prv-accountant agrees."""
    c = budget(109_386, 0.1)
    eps = epsilon_for(0.01, c)
    ours = svt_pld_epsilon(eps, c, 1, DELTA)
    acc = prv.PRVAccountant(
        prvs=[prv.PureDPMechanism(eps * 8 / 9 / c), prv.LaplaceMechanism(eps / (9 * c))],
        max_self_compositions=[c, c],
        eps_error=0.05,
        delta_error=1e-8,
    )
    lo, _, hi = acc.compute_epsilon(DELTA, [c, c])
    assert lo <= ours <= hi
    assert ours < 0.05 * eps  # 4.06 instead of basic composition's 109.4


def test_svt_selection_part_matches_exact_composition_by_hand() -> None:
    """The c above-threshold tests of 30 epochs alone (pure ε1/c each) against the KOV formula."""
    from dp_accounting.pld import common
    from dp_accounting.pld import privacy_loss_distribution as pld
    from dssgd.shared.accounting import _grid_for

    c, epochs = budget(109_386, 0.1), 30
    eps0 = 0.01 * 8 / 9
    k = c * epochs
    one = pld.from_privacy_parameters(
        common.DifferentialPrivacyParameters(eps0, 0.0), _grid_for(eps0)
    )
    ours = one.self_compose(k).get_epsilon_for_delta(DELTA)
    assert kov_delta(eps0, k, ours) <= DELTA * 1.001  # valid
    assert kov_delta(eps0, k, ours * 0.99) > DELTA  # and tight to 1 %


def test_accountant_reports_the_tightest_valid_bound() -> None:
    c = budget(109_386, 0.1)
    acc = PrivacyAccountant(eps_per_epoch=epsilon_for(10.0, c), c=c, epochs=5)
    assert acc.bound == "pld"
    assert acc.total < acc.total_basic == pytest.approx(546_950)
    assert acc.total == pytest.approx(svt_pld_epsilon(epsilon_for(10.0, c), c, 5, DELTA))
    no_c = PrivacyAccountant(eps_per_epoch=epsilon_for(10.0, c), epochs=5)
    assert no_c.bound == "basic" and no_c.total_delta == 0.0


# --- the DP-SGD mechanism self-test -------------------------------------------------------------


class _Scalar(nn.Module):
    """out = w·x for one weight: the loss gradient of record (x, y) is (w·x − y)·x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum()


def _one_step(clip_norm: float, sigma: float, unclipped: bool) -> Callable[[object], float]:
    """One real DP-SGD step on a dataset, as a mechanism: its noisy gradient of the one weight.

    Trainers are built once per dataset (the weight stays 0: noisy_gradient does not step)."""
    gen = torch.Generator().manual_seed(7)
    trainers: dict[int, DpSgdTrainer] = {}

    def mech(data: object) -> float:
        if id(data) not in trainers:
            x, y = data  # type: ignore[misc]
            t = DpSgdTrainer(_Scalar(), x, y, 1.0, 2, clip_norm, sigma, loss=_mse, generator=gen)
            if unclipped:  # the negative control: noise for C, but no per-example clipping
                t.clip = 1e9
                t.sigma = sigma * clip_norm / 1e9
            trainers[id(data)] = t
        t = trainers[id(data)]
        return float(t.noisy_gradient(torch.arange(len(t.x)))["w"])

    return mech


def test_dpsgd_step_within_claim_and_unclipped_step_flagged() -> None:
    """Neighbours: D and D plus one record whose gradient (100) is far past C = 1.

    One step on the whole dataset, σ for ε = 2 at δ: the measured bound must stay below 2;
    without the clip the extra record moves the output by 100 noise units and is flagged."""
    eps = 2.0
    sigma = noise_multiplier(eps, DELTA, 1.0, 1)
    d = (torch.ones(2), torch.zeros(2))
    d2 = (torch.tensor([1.0, 1.0, 100.0]), torch.tensor([0.0, 0.0, -1.0]))
    events = {f"g > {t}": (lambda o, t=t: o > t) for t in (1.0, 2.0, 3.0, 5.0, 10.0)}
    events |= {f"g < {-t}": (lambda o, t=t: o < -t) for t in (1.0, 2.0, 3.0, 5.0)}
    ok = audit(_one_step(1.0, sigma, False), d2, d, events, 1200, pilot=300, delta=DELTA)
    assert ok.epsilon_lb <= eps, ok
    bad = audit(_one_step(1.0, sigma, True), d2, d, events, 1200, pilot=300, delta=DELTA)
    assert bad.epsilon_lb > 2 * eps, bad


# --- the budget stop, through RabbitMQ and Redis ------------------------------------------------


@pytest.mark.integration
def test_participant_over_dpsgd_budget_stops(
    make_run: Callable[..., RunHandle], tmp_path: Path
) -> None:
    """σ fixed at 0.6: ε after each epoch of 19 steps is known; a budget between 2 and 3 epochs'
    figures lets the participant publish exactly two updates, then stop and say why."""
    q, per_epoch = 32 / 600, 19
    two, three = (dpsgd_epsilon(0.6, q, k * per_epoch, DELTA) for k in (2, 3))
    h = make_run(
        participants=1,
        epochs=6,
        dp_mechanism="dpsgd",
        dp_epsilon=(two + three) / 2,
        dp_noise_multiplier=0.6,
        eval_interval=60,
    )
    h.aggregator()
    assert h.spawn("worker", "--participants", "0", log=tmp_path / "w.log").wait(timeout=180) == 0
    progress = h.store.progress(0)
    assert progress["epochs"] == "2"
    assert int(progress["dp_steps"]) == 2 * per_epoch
    assert float(progress["dp_total"]) == pytest.approx(two)
    assert progress["dp_bound"] == "pld"
    assert "privacy budget exhausted: DP-SGD" in progress["stopped"]
    h.wait(lambda: h.version() == 2, what="the two private updates")


def test_status_names_the_bound() -> None:
    from dssgd.status import _epsilon_text

    row = {"epsilon": 4.0592, "epsilon_bound": "pld", "epsilon_delta": 1e-5}
    assert _epsilon_text(row) == "4.059 (pld, δ 1e-05)"
    assert _epsilon_text({"epsilon": 10.0, "epsilon_bound": "basic", "epsilon_delta": 0.0}) == (
        "10 (basic)"
    )
    assert _epsilon_text({"epsilon": None}) == "-"


def test_metrics_name_the_bound() -> None:
    from dssgd.aggregator.metrics import AggregatorMetrics

    m = AggregatorMetrics("r")
    m.set_epsilon(3, 4.06, "pld")
    text = m.render().decode()
    assert 'dssgd_epsilon_spent{participant="3",run="r"} 4.06' in text
    assert 'dssgd_epsilon_bound{bound="pld",participant="3",run="r"} 1.0' in text
    assert 'dssgd_epsilon_bound{bound="basic",participant="3",run="r"} 0.0' in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dp_mechanism": "dpsgd"}, "needs --dp-epsilon"),
        ({"dp_mechanism": "dpsgd", "dp_epsilon": 8.0, "epochs": 0}, "--epochs > 0"),
        ({"dp_mechanism": "dpsgd", "dp_epsilon": 8.0, "dp_eps_per_value": 1.0}, "belong to"),
        ({"dp_epsilon": 8.0}, "need --dp-mechanism dpsgd"),
        ({"dp_mechanism": "laplace"}, "svt or dpsgd"),
        ({"dp_mechanism": "dpsgd", "dp_epsilon": -1.0}, "DP ε must be > 0"),
        ({"dp_mechanism": "dpsgd", "dp_epsilon": 1.0, "dp_clip": 0.0}, "clip norm"),
    ],
)
def test_dpsgd_configuration_mistakes_are_one_clear_line(
    kwargs: dict[str, object], message: str
) -> None:
    from dssgd.shared.config import RunConfig
    from dssgd.shared.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as exc:
        RunConfig(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(exc.value)
    assert RunConfig(dp_mechanism="dpsgd", dp_epsilon=8.0).dpsgd
