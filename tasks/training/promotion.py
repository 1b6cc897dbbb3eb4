"""Promotion: register a trained checkpoint as a `candidate` and move `production` only
when the evaluation passes the configured gate.

Public API:

    PromoteConfig                      the thresholds (``ws.config.train.promote``).
    gate(metrics, cfg) -> (passed, reasons)
        pure: one human-readable reason per check, passed or not, so a decision is
        always explained (also when it passes).
    register_candidate(registry, checkpoint_dir, *, parents, metrics, config, note) -> version
        copies the checkpoint into the registry with its lineage and tags it `candidate`.
    decide_and_apply(registry, model_version, metrics, cfg) -> PromotionDecision
        runs the gate; on pass (and ``auto_promote``) points `production` at the model.

Why a separate gate: the nightly run retrains without a human in the loop, so a bad night
(broken data, diverged run) must not replace the model users are served. A model that was
not evaluated is never promoted unless the config explicitly allows it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from dpoflow.flows.config import Section

PRODUCTION = "production"
CANDIDATE = "candidate"


class PromoteConfig(Section):
    enabled: bool = Field(True, description="run the promotion gate after evaluation (False: register "
                          "the model as candidate only)")
    auto_promote: bool = Field(True, description="move the production tag when the gate passes (False: "
                               "report the decision, a human moves the tag)")
    require_eval: bool = Field(True, description="a model without dpo_eval metrics never passes")
    min_reward_accuracy: float | None = Field(
        0.5, ge=0, le=1, description="lowest held-out reward accuracy (share of eval pairs with chosen "
        "reward > rejected reward); None = not checked")
    min_reward_margin: float | None = Field(
        0.0, description="lowest mean held-out reward margin β·(ρ_w − ρ_l); None = not checked")
    max_eval_loss: float | None = Field(
        None, description="highest held-out preference loss (ln 2 = 0.693 is the untrained DPO loss); "
        "None = not checked")
    min_win_rate: float | None = Field(
        0.5, ge=0, le=1, description="lowest generation win rate against the production model (ties "
        "count half); None = not checked; skipped when there is no production model yet")
    max_nan_steps: int | None = Field(
        None, ge=0, description="most non-finite training steps skipped; None = not checked")


@dataclass
class PromotionDecision:
    model_version: str
    passed: bool
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    previous_production: str | None = None
    production: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def gate(metrics: dict[str, Any], cfg: PromoteConfig, *, has_production: bool = True) -> tuple[bool, list[str]]:
    """Check eval metrics against the thresholds; every check leaves a reason line.

    `metrics` keys: reward_accuracy, reward_margin, eval_loss, win_rate, nan_steps (missing
    or non-finite values fail a configured check: a NaN loss must never promote).
    """
    reasons: list[str] = []
    ok = True
    evaluated = _num(metrics.get("reward_accuracy")) is not None
    if cfg.require_eval and not evaluated:
        return False, ["FAIL no held-out evaluation (dpo_eval) metrics and promote.require_eval is on"]

    def check(name: str, limit: float | None, higher_is_better: bool, label: str) -> None:
        nonlocal ok
        if limit is None:
            return
        value = _num(metrics.get(name))
        if value is None:
            if name == "win_rate" and not has_production:
                reasons.append(f"skip {label}: no production model to compare with")
                return
            if name == "win_rate" and metrics.get("win_rate_skipped"):
                reasons.append(f"skip {label}: {metrics['win_rate_skipped']}")
                return
            ok = False
            reasons.append(f"FAIL {label}: missing or not finite (needs {'≥' if higher_is_better else '≤'} {limit:g})")
            return
        good = value >= limit if higher_is_better else value <= limit
        ok = ok and good
        sign = "≥" if higher_is_better else "≤"
        reasons.append(f"{'pass' if good else 'FAIL'} {label} {value:.4g} (needs {sign} {limit:g})")

    check("reward_accuracy", cfg.min_reward_accuracy, True, "reward accuracy")
    check("reward_margin", cfg.min_reward_margin, True, "reward margin")
    check("eval_loss", cfg.max_eval_loss, False, "eval loss")
    check("win_rate", cfg.min_win_rate, True, "win rate vs production")
    if cfg.max_nan_steps is not None:
        check("nan_steps", float(cfg.max_nan_steps), False, "non-finite training steps")
    return ok, reasons


def register_candidate(registry: Any, checkpoint_dir: str | Path, *, parents: list[str],
                       metrics: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                       note: str | None = None) -> str:
    """Copy a checkpoint into the registry with its lineage, tagged `candidate`; return its version."""
    return registry.register(checkpoint_dir, parents=parents, metrics=metrics, config=config, note=note,
                             tags=[CANDIDATE])


def current_production(registry: Any) -> str | None:
    return registry.tags().get(PRODUCTION)


def decide_and_apply(registry: Any, model_version: str, metrics: dict[str, Any], cfg: PromoteConfig
                     ) -> PromotionDecision:
    """Run the gate for `model_version` and move `production` to it only when it passes."""
    previous = current_production(registry)
    if previous == model_version:
        return PromotionDecision(model_version, True, False, ["already the production model"], previous, previous)
    if not cfg.enabled:
        return PromotionDecision(model_version, False, False, ["promotion disabled (train.promote.enabled)"],
                                 previous, previous)
    passed, reasons = gate(metrics, cfg, has_production=previous is not None)
    promoted = passed and cfg.auto_promote
    if passed and not cfg.auto_promote:
        reasons.append("gate passed, but promote.auto_promote is off: move the tag by hand")
    if promoted:
        registry.tag(model_version, PRODUCTION)
        reasons.append(f"production: {previous or 'none'} -> {model_version}")
    else:
        reasons.append(f"production stays {previous or 'unset'}")
    return PromotionDecision(model_version, passed, promoted, reasons, previous,
                             model_version if promoted else previous)
