"""Bad training configs fail at load time, with a message that names the field and the cause."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from dpoflow.tasks.training.config import TrainConfig
from dpoflow.tasks.training.results import TrainingError
from dpoflow.tasks.training.tokenization import TokenizeStats


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_lr_is_refused(value):
    with pytest.raises(ValidationError, match="lr"):
        TrainConfig(lr=value)


@pytest.mark.parametrize("field", ["beta", "adam_eps", "weight_decay", "simpo_gamma"])
def test_no_float_field_accepts_inf_or_nan(field):
    extra = {"loss": "simpo"} if field == "simpo_gamma" else {}
    with pytest.raises(ValidationError, match="finite number"):
        TrainConfig(**{field: math.nan}, **extra)


def test_negative_or_all_zero_loss_weights_are_refused():
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        TrainConfig(loss=["sigmoid", "ipo"], loss_weights=[1.0, -0.5])
    with pytest.raises(ValidationError, match="all 0"):
        TrainConfig(loss=["sigmoid", "ipo"], loss_weights=[0.0, 0.0])
    with pytest.raises(ValidationError, match="finite"):
        TrainConfig(loss=["sigmoid"], loss_weights=[math.inf])
    assert TrainConfig(loss=["sigmoid", "ipo"], loss_weights=[1.0, 0.0]).loss_weights_ == [1.0, 0.0]


@pytest.mark.parametrize("betas", [(1.5, 0.999), (0.9, 1.0), (-0.1, 0.9)])
def test_adam_betas_outside_0_1_are_refused(betas):
    with pytest.raises(ValidationError, match="adam_betas"):
        TrainConfig(adam_betas=betas)


def test_max_prompt_length_defaults_to_half_of_max_length():
    cfg = TrainConfig(max_length=256)  # refused before: max_prompt_length defaulted to 512
    assert cfg.max_prompt_length is None and cfg.prompt_limit == 128
    assert cfg.tokenization_key()["max_prompt_length"] == 128
    assert TrainConfig().prompt_limit == 512  # the old default for the default max_length
    assert TrainConfig(max_length=256, max_prompt_length=200).prompt_limit == 200
    with pytest.raises(ValidationError, match="max_prompt_length 300 must be smaller than max_length 256"):
        TrainConfig(max_length=256, max_prompt_length=300)
    assert TrainConfig(max_length=2).prompt_limit == 1  # the derived default always leaves room


def test_batch_larger_than_the_data_is_refused_with_the_numbers():
    cfg = TrainConfig(batch_size=8, grad_accum=4)
    cfg.check_pairs(32)
    with pytest.raises(TrainingError, match=r"dpo_train@3 has 31 pairs, fewer than one global batch of 32 "
                                         r"\(batch_size 8 x grad_accum 4 x 1 processes\)"):
        cfg.check_pairs(31, "dpo_train@3")


def test_truncation_share_warning():
    stats = TokenizeStats(n_in=240, n_kept=170, n_prompt_truncated=240, n_completion_truncated=30,
                          n_truncated=170, dropped={"identical_completions": 70})
    assert stats.affected_share == 1.0
    msg = stats.warning(0.2)
    assert msg and "100% of 240 pairs" in msg and "70 identical_completions" in msg
    quiet = TokenizeStats(n_in=100, n_kept=100, n_truncated=10)
    assert quiet.affected_share == pytest.approx(0.1) and quiet.warning(0.2) is None
    assert quiet.warning(0.05) is not None
    with pytest.raises(ValidationError):
        TrainConfig(max_truncated_share=1.5)


def test_data_order_and_packing_settings():
    assert TrainConfig().data_order == "shuffled" and TrainConfig().packing
    assert TrainConfig(data_order="sequential").data_order == "sequential"
    with pytest.raises(ValidationError, match="data_order"):
        TrainConfig(data_order="random")
    with pytest.raises(ValidationError, match="packing_row_factor"):
        TrainConfig(packing_row_factor=0.5)
