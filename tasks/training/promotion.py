"""Promotion: register a trained checkpoint as a `candidate` and move `production` only
when the evaluation gives evidence that it is better.

Public API:

    PromoteConfig                      the thresholds (``ws.config.train.promote``).
    gate(metrics, cfg) -> (passed, reasons)
        pure: one human-readable reason per check, passed or not, so a decision is
        always explained (also when it passes).
    wilson_lower(successes, n, confidence) -> float
        lower bound of the Wilson score interval of a proportion.
    register_candidate(registry, checkpoint_dir, *, parents, metrics, config, note) -> version
        copies the checkpoint into the registry with its lineage and tags it `candidate`
        (idempotent: the registry keys versions by the weights' content hash).
    decide_and_apply(registry, model_version, metrics, cfg, *, allow_promote) -> PromotionDecision
        runs the gate; on pass (and ``auto_promote`` and `allow_promote`) records the
        promotion and points `production` at the model, as one logical step.
    cycle_production(registry, train_data) / cycle_model_ref(registry, ref, train_data)
        the production model as a training cycle on `train_data` saw it before it promoted.

Why a gate that needs evidence: the nightly run retrains without a human in the loop, so a
bad night (broken data, diverged run, a handful of lucky comparisons) must not replace the
model users are served. The generation comparison counts ties as ties and passes only when
the lower confidence bound of the win rate over decisive comparisons clears the threshold,
with a minimum number of compared prompts; held-out reward accuracy and the rule checks
(flagged or empty outputs) must not get worse than production's.

Why "cycle production": a rerun after a kill right after `production` moved must not see
the new model as its starting point (that would train, evaluate and promote a second model
on the same data); it starts from the model the first run started from, so every step is
reused by its content key and the recorded decision is returned again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from pydantic import Field

from dpoflow.tasks.contract import Section

PRODUCTION = "production"
CANDIDATE = "candidate"
MANUAL_RUN = "a manual run moves production only when asked (--promote, or promote=true)"


class PromoteConfig(Section):
    enabled: bool = Field(True, description="run the promotion gate after evaluation (False: register "
                          "the model as candidate only)")
    auto_promote: bool = Field(True, description="move the production tag when the gate passes in the "
                               "scheduled nightly (a manual train run moves it only with --promote / "
                               "promote=true); False: report the decision, a human moves the tag")
    require_eval: bool = Field(True, description="a model without dpo_eval metrics never passes")
    min_reward_accuracy: float | None = Field(
        0.5, ge=0, le=1, description="lowest held-out reward accuracy (share of eval pairs with chosen "
        "reward > rejected reward); None = not checked")
    max_reward_accuracy_drop: float | None = Field(
        0.0, ge=0, le=1, description="non-regression: the new model's held-out reward accuracy may be at most "
        "this much below the production model's on the same pairs; None = not checked")
    min_reward_margin: float | None = Field(
        0.0, description="lowest mean held-out reward margin β·(ρ_w − ρ_l); None = not checked")
    max_eval_loss: float | None = Field(
        None, description="highest held-out preference loss (ln 2 = 0.693 is the untrained DPO loss); "
        "None = not checked")
    min_compared: int = Field(
        30, ge=1, description="fewest held-out prompts in the generation comparison with production; fewer "
        "is 'not enough evidence', never a pass")
    min_win_rate: float | None = Field(
        0.5, ge=0, le=1, description="the lower bound of the Wilson interval of the win rate over decisive "
        "comparisons (wins / (wins + losses); ties are ties) must be above this; None = not checked; "
        "skipped when there is no production model yet")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence level of the win-rate interval "
                              "(two-sided; 0.95 -> z = 1.96)")
    max_flagged_increase: float | None = Field(
        0.0, ge=0, le=1, description="non-regression on the rule checks: the new model's share of flagged or "
        "empty outputs may exceed production's by at most this; None = not checked")
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


def wilson_lower(successes: int, n: int, confidence: float = 0.95) -> float:
    """Lower bound of the two-sided Wilson score interval of successes / n (0 when n is 0).

    Unlike the normal approximation it stays inside [0, 1] and is honest for small n: 2 wins
    out of 2 give 0.34 at 95%, not 1.0."""
    if n <= 0:
        return 0.0
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def _check_comparison(metrics: dict[str, Any], cfg: PromoteConfig, has_production: bool) -> tuple[bool, str]:
    """The generation comparison with production: enough prompts, decisive wins, Wilson bound."""
    label = "generation comparison vs production"
    if not has_production:
        return True, f"skip {label}: no production model to compare with"
    if metrics.get("win_rate_skipped") and metrics.get("n_compared") is None:
        return False, f"FAIL {label}: not run ({metrics['win_rate_skipped']})"
    wins, ties, losses = (int(_num(metrics.get(k)) or 0) for k in ("wins", "ties", "losses"))
    n = int(_num(metrics.get("n_compared")) or 0)
    if n < cfg.min_compared:
        return False, f"not promoted: not enough evidence (n={n} < {cfg.min_compared})"
    decisive = wins + losses
    counts = f"{wins} wins, {ties} ties, {losses} losses of {n}"
    if decisive == 0:
        return False, f"FAIL {label}: no decisive comparison ({counts})"
    lower = wilson_lower(wins, decisive, cfg.confidence)
    rate = wins / decisive
    good = lower > cfg.min_win_rate
    return good, (f"{'pass' if good else 'FAIL'} {label}: {counts}; win rate over decisive {rate:.3f}, "
                  f"{cfg.confidence:.0%} Wilson lower bound {lower:.3f} (needs > {cfg.min_win_rate:g})")


def gate(metrics: dict[str, Any], cfg: PromoteConfig, *, has_production: bool = True) -> tuple[bool, list[str]]:
    """Check eval metrics against the thresholds; every check leaves a reason line.

    `metrics` keys: reward_accuracy, reward_margin, eval_loss, nan_steps; from the generation
    comparison wins, ties, losses, n_compared, flagged_share and baseline_flagged_share; and
    baseline_reward_accuracy (production's on the same pairs). Missing or non-finite values
    fail a configured check: a NaN loss must never promote.
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
        sign = "≥" if higher_is_better else "≤"
        if value is None:
            ok = False
            reasons.append(f"FAIL {label}: missing or not finite (needs {sign} {limit:g})")
            return
        good = value >= limit if higher_is_better else value <= limit
        ok = ok and good
        reasons.append(f"{'pass' if good else 'FAIL'} {label} {value:.4g} (needs {sign} {limit:g})")

    def no_worse(name: str, base_name: str, slack: float | None, higher_is_better: bool, label: str) -> None:
        nonlocal ok
        if slack is None:
            return
        new, base = _num(metrics.get(name)), _num(metrics.get(base_name))
        if base is None:
            reasons.append(f"skip {label}: no production value to compare with")
            return
        if new is None:
            ok = False
            reasons.append(f"FAIL {label}: missing for the new model")
            return
        good = new >= base - slack if higher_is_better else new <= base + slack
        ok = ok and good
        reasons.append(f"{'pass' if good else 'FAIL'} {label}: {new:.4g} vs production {base:.4g}")

    check("reward_accuracy", cfg.min_reward_accuracy, True, "reward accuracy")
    no_worse("reward_accuracy", "baseline_reward_accuracy", cfg.max_reward_accuracy_drop, True,
             "held-out reward accuracy not below production")
    check("reward_margin", cfg.min_reward_margin, True, "reward margin")
    check("eval_loss", cfg.max_eval_loss, False, "eval loss")
    if cfg.min_win_rate is not None:
        good, reason = _check_comparison(metrics, cfg, has_production)
        ok = ok and good
        reasons.append(reason)
    if has_production:
        no_worse("flagged_share", "baseline_flagged_share", cfg.max_flagged_increase, False,
                 "share of flagged or empty outputs not above production")
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


def cycle_production(registry: Any, train_data: str | None) -> str | None:
    """The production model before a model trained on `train_data` was promoted (when the
    current production model is one), else the current production model."""
    prod = current_production(registry)
    if prod is None or not train_data:
        return prod
    rec = registry.recorded_promotion(prod, PRODUCTION)
    if rec is None or not rec.get("previous"):
        return prod
    try:
        parents = registry.get(prod).get("parents") or []
    except Exception:  # a model row that cannot be read: keep the plain tag
        return prod
    return rec["previous"] if train_data in parents else prod


def cycle_model_ref(registry: Any, ref: str | None, train_data: str | None) -> str | None:
    """`ref` for a training cycle on `train_data`: the production tag (or None, meaning it)
    resolves to `cycle_production`; any other ref is returned unchanged."""
    if ref not in (None, f"models@{PRODUCTION}"):
        return ref
    prod = cycle_production(registry, train_data)
    return f"models@{prod}" if prod and prod != current_production(registry) else ref


def night_start_production(registry: Any, night: str | None) -> str | None:
    """The production model `night` started from, when that night already promoted the
    current one (a rerun after a kill past the tag move); else None (use the current one)."""
    prod = current_production(registry)
    if not night or prod is None:
        return None
    rec = registry.recorded_promotion(prod, PRODUCTION)
    if rec is None or rec.get("night") != night or not rec.get("previous"):
        return None
    return rec["previous"]


def decide_and_apply(registry: Any, model_version: str, metrics: dict[str, Any], cfg: PromoteConfig,
                     *, allow_promote: bool = True, night: str | None = None) -> PromotionDecision:
    """Run the gate for `model_version` and move `production` to it only when it passes.

    `allow_promote` False (a manual run not asked to promote) reports the decision only.
    A promotion is recorded before the tag moves (registry.promote); a rerun that finds the
    record returns the recorded decision (finishing the tag move if a kill came between),
    so a killed and rerun promotion equals an uninterrupted one. `night` (the nightly's id:
    its date and sample inputs) is kept in the record, so a rerun of that night starts from the same model
    (`night_start_production`) instead of beginning a second cycle."""
    previous = current_production(registry)
    rec = registry.recorded_promotion(model_version, PRODUCTION)
    if rec is not None and previous in (model_version, rec.get("previous")):
        if previous != model_version:
            registry.promote(model_version, PRODUCTION, expected=rec.get("previous"), record=rec)
        return PromotionDecision(model_version, True, True, list(rec.get("reasons") or []), rec.get("previous"),
                                 model_version)
    if previous == model_version:
        return PromotionDecision(model_version, True, False, ["already the production model"], previous, previous)
    if not cfg.enabled:
        return PromotionDecision(model_version, False, False, ["promotion disabled (train.promote.enabled)"],
                                 previous, previous)
    passed, reasons = gate(metrics, cfg, has_production=previous is not None)
    promoted = passed and cfg.auto_promote and allow_promote
    if passed and not cfg.auto_promote:
        reasons.append("gate passed, but promote.auto_promote is off: move the tag by hand")
    elif passed and not allow_promote:
        reasons.append(f"gate passed, but {MANUAL_RUN}")
    if promoted:
        reasons.append(f"production: {previous or 'none'} -> {model_version}")
        registry.promote(model_version, PRODUCTION, expected=previous,
                         record={"reasons": reasons, "night": night,
                                 "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)}})
    else:
        reasons.append(f"production stays {previous or 'unset'}")
    return PromotionDecision(model_version, passed, promoted, reasons, previous,
                             model_version if promoted else previous)
