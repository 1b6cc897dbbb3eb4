"""From accepted events to per-response signals: one vote per user per (response, vote group),
decayed, position-debiased, and summarised with a Bayesian average and a Wilson interval.

Why per user partition: the events of a user all live in one partition of the accumulator's
state, so the votes of a partition are final there and the per-response sums of the
partitions simply add up (in partition order: the same result on every run).

Signal formulas (also in README.md, "Feedback signals"), per response r over
its winning votes v (after dedup and abuse filtering):

    s_v   = w[type_v]                                  (dwell: w_dwell * min(value_v / dwell_full_ms, 1))
    d_v   = 2 ** (-(T - ts_v) / half_life)             (T = as_of, default: newest valid event, at most the ingest time)
    ipw_v = 1 / max(p[pos_v], p_min)                   (1 when no position is logged)
    e_v   = s_v * d_v * ipw_v
    P = sum(max(e_v, 0)),  N = sum(max(-e_v, 0)),  n = P + N
    positive_share  = P / n
    behaviour_score = (P - N + m * mu0) / (n + m)      (Bayesian average of +-1 votes, m prior votes at mu0)
    wilson_lower    = (p + z^2/2n - z*sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n),  p = P / n
    confidence      = 1 - (wilson_upper - wilson_lower)   (narrow interval -> confident)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dpoflow.storage.schemas import SIGNALS, TS
from dpoflow.tasks.feedback.config import IngestConfig
from dpoflow.tasks.kernels import dense_codes, rows_sharing_a_key


@dataclass
class VoteRules:
    """How event types count: weight per type code, vote group per type code (exclusive types
    share one group, so a later dislike replaces a like), and the dwell type's code."""

    weights: np.ndarray
    vote_group: np.ndarray
    n_groups: int
    dwell: int  # type code of `dwell`, -1 if not configured

    @classmethod
    def from_config(cls, cfg: IngestConfig) -> VoteRules:
        types = list(cfg.event_weights)
        code = {t: i for i, t in enumerate(types)}
        group = np.arange(len(types))
        for gi, grp in enumerate(cfg.exclusive_groups):
            for t in grp:
                if t in code:
                    group[code[t]] = len(types) + gi
        return cls(np.array([cfg.event_weights[t] for t in types], float), group,
                   len(types) + len(cfg.exclusive_groups), code.get("dwell", -1))


@dataclass
class VoteSums:
    """Per-response sums over the winning votes, added up across partitions."""

    P: np.ndarray
    N: np.ndarray
    n_users: np.ndarray
    n_events: np.ndarray
    last: np.ndarray  # newest event ts (us) per response

    @classmethod
    def zeros(cls, R: int) -> VoteSums:
        return cls(np.zeros(R), np.zeros(R), np.zeros(R, np.int64), np.zeros(R, np.int64),
                   np.full(R, np.iinfo(np.int64).min))

    def add(self, other: VoteSums) -> None:
        self.P += other.P
        self.N += other.N
        self.n_users += other.n_users
        self.n_events += other.n_events
        np.maximum(self.last, other.last, out=self.last)


def wilson_interval(p: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion p observed over n (n may be fractional evidence)."""
    n = np.asarray(n, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = np.where(n > 0, centre - half, 0.0)
    hi = np.where(n > 0, centre + half, 1.0)
    return np.clip(lo, 0, 1), np.clip(hi, 0, 1)


def ipw_per_position(props: dict[int, float], min_propensity: float) -> np.ndarray | None:
    """Inverse-propensity weight per position (None without a propensity table). Positions
    missing inside the table take the nearest configured position above them."""
    if not props:
        return None
    top = max(props)
    p = np.array([props.get(k, np.nan) for k in range(top + 1)], float)
    for k in range(top - 1, -1, -1):
        if np.isnan(p[k]):
            p[k] = p[k + 1]
    return 1.0 / np.maximum(np.nan_to_num(p, nan=1.0), min_propensity)


def partition_votes(c: dict[str, np.ndarray], rules: VoteRules, R: int, as_of_us: int,
                    ipw: np.ndarray | None, cfg: IngestConfig) -> VoteSums:
    """One partition's live events (`c`: the accumulator's by-user columns) -> one vote per user
    per (response, vote group), latest ts wins, then latest arrival -> per-response sums."""
    row, resp, etype, ts = c["row"], c["resp"], c["etype"], c["ts"]
    user, _ = dense_codes(c["uh"])
    G = rules.n_groups
    R = max(R, 1)
    vkey = (user.astype(np.int64) * R + resp) * G + rules.vote_group[etype]
    sk = np.sort(vkey)  # the one sort: repeated votes and the distinct (user, response) pairs
    sub = rows_sharing_a_key(vkey, sk)
    pk = sk // G
    del sk
    pk = pk[np.r_[True, pk[1:] != pk[:-1]]]
    n_users = np.bincount(pk % R, minlength=R)
    del pk
    winner = np.ones(len(row), bool)
    if len(sub):
        order = np.lexsort((row[sub], ts[sub], vkey[sub]))
        ks = vkey[sub][order]
        last_of = np.ones(len(sub), bool)
        last_of[:-1] = ks[1:] != ks[:-1]
        winner[sub] = False
        winner[sub[order[last_of]]] = True
    del vkey
    v = np.flatnonzero(winner)
    et = etype[v]
    s = rules.weights[et]
    if rules.dwell >= 0:
        dw = et == rules.dwell
        if dw.any():
            s[dw] *= np.clip(np.nan_to_num(c["value"][v[dw]]) / cfg.dwell_full_ms, 0, 1)
    age = np.maximum(as_of_us - ts[v], 0) / 1e6 / 86400.0
    e = s * np.exp(age * (-np.log(2) / cfg.half_life_days))  # 2 ** (-age / half_life); exp is SIMD
    if ipw is not None:
        pv = c["pos"][v]
        has = pv >= 0
        e[has] *= ipw[np.minimum(pv[has], len(ipw) - 1)]
    r = resp[v]
    last = np.full(R, np.iinfo(np.int64).min)
    np.maximum.at(last, resp, ts)
    return VoteSums(np.bincount(r, np.maximum(e, 0), minlength=R), np.bincount(r, np.maximum(-e, 0), minlength=R),
                    n_users, np.bincount(resp, minlength=R), last)


def signals_table(sums: VoteSums, response_ids: pa.Array, cfg: IngestConfig) -> pa.Table:
    """The SIGNALS rows of every response with at least one live event."""
    keep = np.nonzero(sums.n_events > 0)[0]
    P, N = sums.P[keep], sums.N[keep]
    n = P + N
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(n > 0, P / n, np.nan)
    lo, hi = wilson_interval(np.nan_to_num(share), n, cfg.wilson_z)
    m = cfg.prior_strength
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(n + m > 0, (P - N + m * cfg.prior_mean) / (n + m), cfg.prior_mean)
    ids = response_ids.take(pa.array(keep, pa.int64())) if len(response_ids) else pa.nulls(0, pa.string())
    return pa.table({
        "candidate_id": ids, "behaviour_score": score, "confidence": np.where(n > 0, 1 - (hi - lo), 0.0),
        "positive_share": pa.array(share, pa.float64(), from_pandas=True),
        "wilson_lower": lo, "n_users": sums.n_users[keep], "n_events": sums.n_events[keep],
        "last_ts": pa.array(sums.last[keep], pa.int64()).cast(TS),
    }, schema=SIGNALS)


def signal_formulas_markdown() -> str:
    """The formulas as markdown (README / benchmarks copy)."""
    return (__doc__ or "").split("Signal formulas", 1)[-1]
