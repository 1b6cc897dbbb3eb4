"""Preference losses, each exact and documented: a swapped or mis-parameterised loss is an error.

Public API (stable):

    LogpBatch(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
              ref_chosen_logps=None, ref_rejected_logps=None)     summed completion log-probs.
    PreferenceLoss(names, weights=None, beta=0.1, label_smoothing=None, simpo_gamma=None,
                   rpo_alpha=None)                                  the configured objective.
    PreferenceLoss.from_config(cfg: TrainConfig)
    loss.terms(batch) -> LossTerms     per-pair losses (weighted over the selected losses),
                                       the RPO NLL sum and the implicit rewards (for metrics).
    loss.reduce(terms, n_pairs, n_chosen_tokens) -> scalar
                                       Σ pair_losses / n_pairs + α · NLL_sum / n_chosen_tokens.
                                       The trainer passes the counts of the whole optimizer step
                                       (all micro-batches, all processes), which makes gradient
                                       accumulation and data parallelism exact.
    loss(batch) -> (scalar, terms)     the same with this batch's own counts.
    LOSS_NAMES, REFERENCE_FREE, PARAM_USERS, validate_loss_params(...)

Notation: for a pair (x, y_w, y_l) with summed completion log-probs π_w = log πθ(y_w|x),
π_l, reference r_w = log π_ref(y_w|x), r_l, and completion token counts n_w, n_l:

    chosen log-ratio   ρ_w = π_w − r_w          rejected log-ratio   ρ_l = π_l − r_l
    h = ρ_w − ρ_l  (DPO logit)                  σ = logistic sigmoid, logσ = log-sigmoid

Every loss below is per pair; the batch loss is the mean over pairs (weighted sum over
losses when several are selected). Implicit rewards reported as metrics are β·ρ_w and β·ρ_l
(β·π_w/n_w and β·π_l/n_l when only reference-free losses are selected).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpoflow.tasks.training.loss_names import (  # noqa: F401  (re-exported: part of this module's API)
    LOSS_NAMES,
    PARAM_USERS,
    REFERENCE_FREE,
    validate_loss_params,
)

Tensor = torch.Tensor


@dataclass
class LogpBatch:
    """Summed completion log-probs and token counts for B pairs (all tensors of shape [B])."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None


@dataclass
class LossTerms:
    pair_losses: Tensor  # [B], weighted sum over the selected losses
    nll_sum: Tensor  # scalar: Σ over chosen tokens of −log πθ (the RPO term before α / n_tokens)
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor  # [B], detached


class _Ctx:
    """What a loss function sees: the batch, β, the optional parameters and the bco state."""

    def __init__(self, b: LogpBatch, beta: float, eps: float, gamma: float, bco: _RunningMean):
        self.b, self.beta, self.eps, self.gamma, self.bco = b, beta, eps, gamma, bco

    def _ref(self) -> tuple[Tensor, Tensor]:
        if self.b.ref_chosen_logps is None or self.b.ref_rejected_logps is None:
            raise ValueError("this loss needs reference log-probs (ref_logps) and none were given")
        return self.b.ref_chosen_logps, self.b.ref_rejected_logps

    def ratios(self) -> tuple[Tensor, Tensor]:
        rw, rl = self._ref()
        return self.b.chosen_logps - rw, self.b.rejected_logps - rl

    def avg_ratios(self) -> tuple[Tensor, Tensor]:
        rw, rl = self._ref()
        return ((self.b.chosen_logps - rw) / self.b.chosen_tokens,
                (self.b.rejected_logps - rl) / self.b.rejected_tokens)


def _smoothed(z: Tensor, eps: float) -> Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def sigmoid(c: _Ctx) -> Tensor:
    """DPO / conservative DPO: −(1−ε)·logσ(βh) − ε·logσ(−βh); ε = label_smoothing (0 when unset)."""
    w, lo = c.ratios()
    return _smoothed(c.beta * (w - lo), c.eps)


def robust(c: _Ctx) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): [−(1−ε)·logσ(βh) + ε·logσ(−βh)] / (1 − 2ε); needs ε > 0."""
    w, lo = c.ratios()
    z = c.beta * (w - lo)
    return (-F.logsigmoid(z) * (1 - c.eps) + F.logsigmoid(-z) * c.eps) / (1 - 2 * c.eps)


def ipo(c: _Ctx) -> Tensor:
    """IPO (Azar et al. 2023) on token-averaged log-ratios: (h̄ − 1/(2β))², h̄ = ρ_w/n_w − ρ_l/n_l."""
    w, lo = c.avg_ratios()
    return (w - lo - 1 / (2 * c.beta)) ** 2


def hinge(c: _Ctx) -> Tensor:
    """SLiC hinge: max(0, 1 − βh)."""
    w, lo = c.ratios()
    return torch.relu(1 - c.beta * (w - lo))


def nca_pair(c: _Ctx) -> Tensor:
    """NCA (Chen et al. 2024): −logσ(βρ_w) − ½·logσ(−βρ_w) − ½·logσ(−βρ_l)."""
    w, lo = c.ratios()
    return (-F.logsigmoid(c.beta * w) - 0.5 * F.logsigmoid(-c.beta * w)
            - 0.5 * F.logsigmoid(-c.beta * lo))


def sppo_hard(c: _Ctx) -> Tensor:
    """SPPO with hard labels: (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²."""
    w, lo = c.ratios()
    return (w - 1 / (2 * c.beta)) ** 2 + (lo + 1 / (2 * c.beta)) ** 2


def apo_zero(c: _Ctx) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024): (1 − σ(βρ_w)) + σ(βρ_l). Raises chosen, lowers rejected."""
    w, lo = c.ratios()
    return (1 - torch.sigmoid(c.beta * w)) + torch.sigmoid(c.beta * lo)


def apo_down(c: _Ctx) -> Tensor:
    """APO-down: σ(βρ_w) + (1 − σ(β(ρ_w − ρ_l))). Lowers both, rejected more."""
    w, lo = c.ratios()
    return torch.sigmoid(c.beta * w) + (1 - torch.sigmoid(c.beta * (w - lo)))


def bco_pair(c: _Ctx) -> Tensor:
    """BCO on pairs (Jung et al. 2024): −logσ(βρ_w − δ) − logσ(−(βρ_l − δ)).

    δ is the running mean of all rewards βρ seen so far (chosen and rejected, this batch
    included: the batch is added before δ is read), kept per process and checkpointed.
    """
    w, lo = c.ratios()
    rw, rl = c.beta * w, c.beta * lo
    delta = c.bco.update(torch.cat([rw, rl]).detach())
    return -F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))


def sigmoid_norm(c: _Ctx) -> Tensor:
    """Length-normalised DPO: −logσ(β·h̄), h̄ = ρ_w/n_w − ρ_l/n_l (per-token log-ratios)."""
    w, lo = c.avg_ratios()
    return -F.logsigmoid(c.beta * (w - lo))


def simpo(c: _Ctx) -> Tensor:
    """SimPO (Meng et al. 2024), reference-free: z = β(π_w/n_w − π_l/n_l) − γ;
    loss −(1−ε)·logσ(z) − ε·logσ(−z) (γ = simpo_gamma, 0 when unset; ε = label_smoothing)."""
    b = c.b
    z = c.beta * (b.chosen_logps / b.chosen_tokens - b.rejected_logps / b.rejected_tokens) - c.gamma
    return _smoothed(z, c.eps)


LOSSES: dict[str, Callable[[_Ctx], Tensor]] = {
    f.__name__: f for f in (sigmoid, robust, ipo, hinge, nca_pair, sppo_hard, apo_zero, apo_down,
                            bco_pair, sigmoid_norm, simpo)
}


class _RunningMean:
    """Running mean over every value seen (bco_pair's δ)."""

    def __init__(self) -> None:
        self.mean, self.count = 0.0, 0

    def update(self, values: Tensor) -> float:
        n = values.numel()
        if n:
            self.mean = (self.mean * self.count + float(values.double().sum())) / (self.count + n)
            self.count += n
        return self.mean


class PreferenceLoss:
    """The configured objective: Σ_k w_k · loss_k per pair, plus the optional RPO NLL term."""

    def __init__(self, names: str | Sequence[str], weights: Sequence[float] | None = None, *,
                 beta: float = 0.1, label_smoothing: float | None = None,
                 simpo_gamma: float | None = None, rpo_alpha: float | None = None):
        self.names = [names] if isinstance(names, str) else list(names)
        validate_loss_params(self.names, weights, label_smoothing=label_smoothing,
                             simpo_gamma=simpo_gamma, rpo_alpha=rpo_alpha)
        if beta <= 0:
            raise ValueError("beta must be > 0")
        self.weights = list(weights) if weights is not None else [1.0] * len(self.names)
        self.beta, self.eps = float(beta), float(label_smoothing or 0.0)
        self.gamma, self.rpo_alpha = float(simpo_gamma or 0.0), rpo_alpha
        self.needs_reference = any(n not in REFERENCE_FREE for n in self.names)
        self._bco = _RunningMean()

    @classmethod
    def from_config(cls, cfg) -> PreferenceLoss:
        return cls(cfg.loss_names, cfg.loss_weights, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                   simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha)

    def terms(self, b: LogpBatch) -> LossTerms:
        c = _Ctx(b, self.beta, self.eps, self.gamma, self._bco)
        pair = sum(w * LOSSES[n](c) for n, w in zip(self.names, self.weights, strict=True))
        with torch.no_grad():
            if self.needs_reference:
                cw, cl = c.ratios()
            else:
                cw, cl = b.chosen_logps / b.chosen_tokens, b.rejected_logps / b.rejected_tokens
            rewards = (self.beta * cw.detach(), self.beta * cl.detach())
        return LossTerms(pair_losses=pair, nll_sum=-b.chosen_logps.sum(),
                         chosen_rewards=rewards[0], rejected_rewards=rewards[1])

    def reduce(self, t: LossTerms, n_pairs: float, n_chosen_tokens: float) -> Tensor:
        """Mean over the optimizer step's pairs (+ α · NLL per chosen token of the step)."""
        loss = t.pair_losses.sum() / n_pairs
        if self.rpo_alpha:
            loss = loss + self.rpo_alpha * t.nll_sum / n_chosen_tokens
        return loss

    def __call__(self, b: LogpBatch) -> tuple[Tensor, LossTerms]:
        t = self.terms(b)
        return self.reduce(t, b.chosen_logps.numel(), float(b.chosen_tokens.sum())), t

    def state_dict(self) -> dict:
        return {"bco_mean": self._bco.mean, "bco_count": self._bco.count}

    def load_state_dict(self, state: dict) -> None:
        self._bco.mean, self._bco.count = float(state["bco_mean"]), int(state["bco_count"])
