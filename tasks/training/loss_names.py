"""Loss names and their parameter rules, without torch: the config validates a loss choice
(every `dpoflow` command loads the config) without importing the training stack."""

from __future__ import annotations

from collections.abc import Sequence

LOSS_NAMES = ("sigmoid", "robust", "ipo", "hinge", "nca_pair", "sppo_hard", "apo_zero", "apo_down",
              "bco_pair", "sigmoid_norm", "simpo")
REFERENCE_FREE = frozenset({"simpo"})
# Which losses read each optional parameter (rpo_alpha is an extra term usable with any loss).
PARAM_USERS: dict[str, frozenset[str]] = {
    "label_smoothing": frozenset({"sigmoid", "robust", "simpo"}),
    "simpo_gamma": frozenset({"simpo"}),
}


def validate_loss_params(names: Sequence[str], weights: Sequence[float] | None = None, *,
                         label_smoothing: float | None = None, simpo_gamma: float | None = None,
                         rpo_alpha: float | None = None) -> None:
    """Unknown names, duplicate names, mismatched weights or unused parameters are errors."""
    if not names:
        raise ValueError("no loss selected")
    unknown = [n for n in names if n not in LOSS_NAMES]
    if unknown:
        raise ValueError(f"unknown loss {unknown[0]!r}; known losses: {', '.join(LOSS_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"loss listed twice in {list(names)}")
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} losses")
    for param, value in (("label_smoothing", label_smoothing), ("simpo_gamma", simpo_gamma)):
        if value is not None and not PARAM_USERS[param] & set(names):
            raise ValueError(f"{param}={value} is not used by loss {list(names)} "
                             f"(only by {sorted(PARAM_USERS[param])}); remove it")
    if "robust" in names and not label_smoothing:
        raise ValueError("robust loss needs label_smoothing (ε) in (0, 0.5)")
    if label_smoothing is not None and not 0 <= label_smoothing < 0.5:
        raise ValueError("label_smoothing must be in [0, 0.5)")
    if rpo_alpha is not None and rpo_alpha < 0:
        raise ValueError("rpo_alpha must be >= 0")
