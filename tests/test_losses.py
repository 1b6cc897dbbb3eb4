"""Golden values for every preference loss, computed by hand with scalar math (no torch).

One pair unless noted: π_w=-10, π_l=-12 (policy), r_w=r_l=-11 (reference), n_w=2, n_l=4 tokens,
so ρ_w = 1, ρ_l = -1, h = ρ_w - ρ_l = 2, per-token ratios ρ_w/n_w = 0.5, ρ_l/n_l = -0.25.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.losses import LOSS_NAMES, LogpBatch, PreferenceLoss


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def batch(pw=-10.0, pl=-12.0, rw=-11.0, rl=-11.0, nw=2.0, nl=4.0) -> LogpBatch:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return LogpBatch(t(pw), t(pl), t(nw), t(nl), t(rw), t(rl))


def value(names, b=None, **kw) -> float:
    loss, _ = PreferenceLoss(names, **kw)(b or batch())
    return float(loss)


GOLDEN = [
    # (loss, params, expected)
    ("sigmoid", {"beta": 0.5}, 0.31326168751822286),  # -logσ(1) = log(1 + e^-1)
    ("sigmoid", {"beta": 0.5, "label_smoothing": 0.1}, 0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228),
    ("robust", {"beta": 0.5, "label_smoothing": 0.1}, (0.9 * 0.31326168751822286 - 0.1 * 1.3132616875182228) / 0.8),
    ("ipo", {"beta": 0.5}, 0.0625),  # (0.5 - (-0.25) - 1/(2·0.5))² = (-0.25)²
    ("hinge", {"beta": 0.25}, 0.5),  # max(0, 1 - 0.25·2)
    ("hinge", {"beta": 1.0}, 0.0),  # max(0, 1 - 2)
    ("nca_pair", {"beta": 0.5}, -logsig(0.5) - 0.5 * logsig(-0.5) - 0.5 * logsig(0.5)),
    ("sppo_hard", {"beta": 0.25}, 2.0),  # (1 - 2)² + (-1 + 2)²
    ("apo_zero", {"beta": 0.5}, (1 - sig(0.5)) + sig(-0.5)),
    ("apo_down", {"beta": 0.5}, sig(0.5) + 1 - sig(1.0)),
    ("bco_pair", {"beta": 0.5}, 2 * 0.47407698418010669),  # δ = mean(0.5, -0.5) = 0: -2·logσ(0.5)
    ("sigmoid_norm", {"beta": 0.5}, math.log1p(math.exp(-0.375))),  # -logσ(0.5·0.75)
    # SimPO: β=2, γ=0.5: z = 2·(-10/2 - (-12/4)) - 0.5 = -4.5
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}, math.log1p(math.exp(4.5))),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": 0.1},
     0.9 * math.log1p(math.exp(4.5)) + 0.1 * math.log1p(math.exp(-4.5))),
]


@pytest.mark.parametrize(("name", "params", "expected"), GOLDEN, ids=[f"{g[0]}-{i}" for i, g in enumerate(GOLDEN)])
def test_golden_values(name, params, expected):
    assert value(name, **params) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_every_listed_loss_has_a_golden_value():
    assert {g[0] for g in GOLDEN} == set(LOSS_NAMES)


def test_literal_numbers_by_hand():
    # a few fully numeric checks, independent of the helpers above
    assert value("sigmoid", beta=0.5) == pytest.approx(0.3132616875, abs=1e-9)
    assert value("ipo", beta=0.5) == pytest.approx(0.0625, abs=1e-12)
    assert value("apo_zero", beta=0.5) == pytest.approx(0.7550813376, abs=1e-9)
    assert value("apo_down", beta=0.5) == pytest.approx(0.8914007526, abs=1e-9)
    assert value("simpo", beta=2.0, simpo_gamma=0.5) == pytest.approx(4.5110477448, abs=1e-9)


def test_length_normalisation_matters():
    # same sums, different token counts: ipo / sigmoid_norm / simpo change, sigmoid does not
    b1, b2 = batch(nw=2, nl=4), batch(nw=3, nl=4)
    assert value("sigmoid", b1, beta=0.5) == value("sigmoid", b2, beta=0.5)
    for name, kw in (("ipo", {}), ("sigmoid_norm", {}), ("simpo", {"simpo_gamma": 0.5})):
        assert value(name, b1, beta=0.5, **kw) != pytest.approx(value(name, b2, beta=0.5, **kw))
    # b2: per-token ratios 1/3 and -1/4 -> h̄ = 7/12
    assert value("ipo", b2, beta=0.5) == pytest.approx((7 / 12 - 1) ** 2)
    assert value("simpo", b2, beta=2.0, simpo_gamma=0.5) == pytest.approx(math.log1p(math.exp(-(2 * (-10 / 3 + 3) - 0.5))))


def test_bco_running_mean_carries_over_batches():
    loss = PreferenceLoss("bco_pair", beta=0.5)
    loss(batch())  # rewards 0.5, -0.5 -> δ = 0
    second, _ = loss(batch(pw=-8, pl=-10))  # ρ_w = 3, ρ_l = 1 -> rewards 1.5, 0.5; δ = (0 + 2) / 4 = 0.5
    assert float(second) == pytest.approx(-logsig(1.0) - logsig(0.0))
    fresh = PreferenceLoss("bco_pair", beta=0.5)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.state_dict() == loss.state_dict()


def test_rpo_term_and_combination():
    # RPO: + α · NLL per chosen token = 0.5 · (10 / 2)
    assert value("sigmoid", beta=0.5, rpo_alpha=0.5) == pytest.approx(0.31326168751822286 + 2.5)
    combo = value(["sigmoid", "ipo"], beta=0.5, weights=[0.7, 0.3])
    assert combo == pytest.approx(0.7 * 0.31326168751822286 + 0.3 * 0.0625)


def test_batch_mean_and_rewards():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    b = LogpBatch(t(-10, -10), t(-12, -8), t(2, 2), t(4, 4), t(-11, -11), t(-11, -11))
    loss, terms = PreferenceLoss("sigmoid", beta=0.5)(b)
    # pair 2: ρ_w = 1, ρ_l = 3, h = -2 -> -logσ(-1)
    assert float(loss) == pytest.approx((0.31326168751822286 + 1.3132616875182228) / 2)
    assert terms.chosen_rewards.tolist() == [0.5, 0.5]
    assert terms.rejected_rewards.tolist() == [-0.5, 1.5]


def test_gradient_direction_raises_chosen():
    pw = torch.tensor([-10.0], requires_grad=True)
    pl = torch.tensor([-12.0], requires_grad=True)
    b = LogpBatch(pw, pl, torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    loss, _ = PreferenceLoss("sigmoid", beta=0.5)(b)
    loss.backward()
    # d/dπ_w [-logσ(β h)] = -β σ(-β h)
    assert float(pw.grad) == pytest.approx(-0.5 * sig(-1.0), rel=1e-6)
    assert float(pl.grad) == pytest.approx(0.5 * sig(-1.0), rel=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"names": "dpo"}, "unknown loss 'dpo'"),
    ({"names": "hinge", "label_smoothing": 0.1}, "label_smoothing=0.1 is not used"),
    ({"names": "sigmoid", "simpo_gamma": 0.5}, "simpo_gamma=0.5 is not used"),
    ({"names": "robust"}, "robust loss needs label_smoothing"),
    ({"names": ["sigmoid", "ipo"], "weights": [1.0]}, "loss_weights has 1 entries"),
    ({"names": ["sigmoid", "sigmoid"]}, "listed twice"),
])
def test_errors_never_fall_back(kwargs, match):
    names = kwargs.pop("names")
    with pytest.raises(ValueError, match=match):
        PreferenceLoss(names, **kwargs)


def test_reference_needed_is_an_error():
    b = LogpBatch(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        PreferenceLoss("sigmoid")(b)
    loss, _ = PreferenceLoss("simpo")(b)  # reference-free
    assert torch.isfinite(loss)


def test_config_validates_losses():
    with pytest.raises(ValidationError, match="unknown loss"):
        TrainConfig(loss="dpo")
    with pytest.raises(ValidationError, match="not used"):
        TrainConfig(loss="ipo", label_smoothing=0.1)
    cfg = TrainConfig(loss=["simpo"], simpo_gamma=1.0, beta=2.0)
    assert not cfg.needs_reference
    assert TrainConfig(loss=["simpo", "sigmoid"], loss_weights=[1, 2]).needs_reference
    assert PreferenceLoss.from_config(cfg).gamma == 1.0


def test_torch_free_loss_names_list_every_loss():
    """The config validates loss names without torch; that list must match the real losses."""
    from dpoflow.tasks.training.loss_names import LOSS_NAMES
    from dpoflow.tasks.training.losses import LOSSES

    assert tuple(LOSSES) == LOSS_NAMES
