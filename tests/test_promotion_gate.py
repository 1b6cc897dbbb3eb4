"""The promotion gate needs evidence: enough compared prompts, decisive wins above a
confidence bound, no regression on held-out reward accuracy or on the rule checks."""

from __future__ import annotations

import pytest

from dpoflow.flows.workspace import Workspace
from dpoflow.tasks.training.promotion import (
    MANUAL_RUN,
    PromoteConfig,
    cycle_model_ref,
    cycle_production,
    decide_and_apply,
    gate,
    night_start_production,
    wilson_lower,
)
from tests.builders import GATE_GOOD as GOOD
from tests.builders import distinct_model


def test_wilson_lower_bound():
    assert wilson_lower(0, 0) == 0.0
    assert wilson_lower(2, 2) == pytest.approx(0.342, abs=1e-3)  # two lucky wins prove little
    assert wilson_lower(33, 35) == pytest.approx(0.814, abs=1e-3)
    assert wilson_lower(50, 100) < 0.5 < wilson_lower(70, 100)


def test_all_ties_is_not_promoted():
    ok, reasons = gate({**GOOD, "wins": 0, "ties": 40, "losses": 0}, PromoteConfig())
    assert not ok
    assert any("FAIL generation comparison" in r and "no decisive comparison (0 wins, 40 ties, 0 losses of 40)" in r
               for r in reasons)


def test_too_few_compared_prompts_is_not_enough_evidence():
    ok, reasons = gate({**GOOD, "wins": 2, "ties": 0, "losses": 0, "n_compared": 2}, PromoteConfig())
    assert not ok and "not promoted: not enough evidence (n=2 < 30)" in reasons
    # the demo night of the issue: 2 prompts, 0 wins, 2 ties: win rate 0.5 once passed
    ok, reasons = gate({**GOOD, "wins": 0, "ties": 2, "losses": 0, "n_compared": 2, "win_rate": 0.5},
                       PromoteConfig())
    assert not ok and "not promoted: not enough evidence (n=2 < 30)" in reasons
    ok, _ = gate({"reward_accuracy": 0.9, "reward_margin": 0.2, "win_rate": 0.9}, PromoteConfig())
    assert not ok  # a bare win rate without counts is no evidence


def test_clearly_better_model_passes_with_every_reason():
    ok, reasons = gate(GOOD, PromoteConfig())
    assert ok, reasons
    text = "\n".join(reasons)
    assert "pass generation comparison vs production: 33 wins, 5 ties, 2 losses of 40" in text
    assert "Wilson lower bound 0.8" in text
    assert "pass held-out reward accuracy not below production: 0.8 vs production 0.5" in text
    assert "pass share of flagged or empty outputs not above production: 0 vs production 0.1" in text


def test_ties_do_not_count_as_half_wins():
    # 10 wins, 30 ties, 10 losses: the old gate saw win rate 0.5 and passed
    ok, reasons = gate({**GOOD, "wins": 10, "ties": 30, "losses": 10, "n_compared": 50}, PromoteConfig())
    assert not ok and any("win rate over decisive 0.500" in r for r in reasons)


def test_regressions_fail():
    ok, reasons = gate({**GOOD, "reward_accuracy": 0.6, "baseline_reward_accuracy": 0.7}, PromoteConfig())
    assert not ok and any(r.startswith("FAIL held-out reward accuracy not below production") for r in reasons)
    ok, reasons = gate({**GOOD, "flagged_share": 0.3, "baseline_flagged_share": 0.1}, PromoteConfig())
    assert not ok and any(r.startswith("FAIL share of flagged or empty outputs") for r in reasons)
    ok, reasons = gate({**GOOD, "eval_loss": float("nan")}, PromoteConfig(max_eval_loss=0.69))
    assert not ok and any(r.startswith("FAIL eval loss") for r in reasons)
    ok, reasons = gate({}, PromoteConfig())
    assert not ok and "no held-out evaluation" in reasons[0]


def test_first_model_skips_the_comparison():
    ok, reasons = gate({"reward_accuracy": 0.8, "reward_margin": 0.1}, PromoteConfig(), has_production=False)
    assert ok and any(r.startswith("skip generation comparison") for r in reasons)


@pytest.fixture
def reg_models(tmp_path, tiny_model_dir):
    ws = Workspace.open(tmp_path / "ws")
    reg = ws.registry
    base = reg.register(tiny_model_dir, tags=["production"])
    new = [reg.register(distinct_model(tiny_model_dir, tmp_path / f"m{k}", k), parents=["dpo_train@0"],
                        tags=["candidate"]) for k in (1, 2)]
    return reg, base, new


def test_decide_and_apply_both_ways_and_manual_runs(reg_models):
    reg, base, (weak, good) = reg_models
    d = decide_and_apply(reg, weak, {**GOOD, "wins": 1, "losses": 1}, PromoteConfig())
    assert not d.passed and not d.promoted and reg.version_of("models@production") == base
    d = decide_and_apply(reg, good, GOOD, PromoteConfig(), allow_promote=False)  # a manual run
    assert d.passed and not d.promoted and any(MANUAL_RUN in r for r in d.reasons)
    assert reg.version_of("models@production") == base
    d = decide_and_apply(reg, good, GOOD, PromoteConfig(auto_promote=False))
    assert d.passed and not d.promoted and reg.version_of("models@production") == base
    d = decide_and_apply(reg, good, GOOD, PromoteConfig())
    assert d.passed and d.promoted and d.previous_production == base and d.reasons[-1] == f"production: {base} -> {good}"
    assert reg.version_of("models@production") == good
    again = decide_and_apply(reg, good, GOOD, PromoteConfig())  # a rerun: the recorded decision, not a new one
    assert again == d
    assert [e["model_version"] for e in reg.promotions_log()] == [good]


def test_cycle_production_is_the_model_the_cycle_started_from(reg_models):
    reg, base, (_, good) = reg_models
    decide_and_apply(reg, good, GOOD, PromoteConfig())
    assert cycle_production(reg, "dpo_train@0") == base  # good was trained on dpo_train@0
    assert cycle_production(reg, "dpo_train@1") == good  # the next night's data starts from good
    assert cycle_model_ref(reg, None, "dpo_train@0") == f"models@{base}"
    assert cycle_model_ref(reg, "models@production", "dpo_train@1") == "models@production"
    assert cycle_model_ref(reg, "/some/folder", "dpo_train@0") == "/some/folder"


def test_a_night_that_promoted_restarts_from_the_model_it_started_with(reg_models):
    from dpoflow.storage.store import StoreError

    reg, base, (_, good) = reg_models
    assert night_start_production(reg, "2026-11-29") is None  # nothing promoted yet: the current model
    decide_and_apply(reg, good, GOOD, PromoteConfig(), night="2026-11-29")
    assert reg.promotions_log()[-1]["night"] == "2026-11-29"
    assert night_start_production(reg, "2026-11-29") == base  # the same night: where it started
    assert night_start_production(reg, "2026-11-30") is None  # the next night starts from `good`
    assert night_start_production(reg, None) is None
    view = reg.with_tags({"production": base})  # what the rerun of the night samples with
    assert view.version_of("models@production") == base and reg.version_of("models@production") == good
    with pytest.raises(StoreError, match="read-only"):
        view.tag(good, "production")
    assert reg.tags()["production"] == good
