"""The run's event state and the decisions over all of it: exactly-once and the abuse filters.

Why it looks like this: both decisions need every event of a key at once (all rows of an
event id; all events of a user), over prior and new events together, for tens of millions of
events. So each valid row is reduced to compact numbers (64-bit hashes of ids, integer codes,
times) and filed into hash partitions (tasks/partitions.py), event-id hashes by event id and
the rest by user; the partitions stay in memory up to `ingest.state_memory_mb` and spill to
scratch files past it. The decisions then run one partition at a time, two in parallel.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpoflow.tasks.feedback.config import IngestConfig
from dpoflow.tasks.feedback.signals import (
    VoteRules,
    VoteSums,
    ipw_per_position,
    partition_votes,
    signals_table,
)
from dpoflow.tasks.kernels import (
    Codes,
    dense_codes,
    dict_parts,
    distinct,
    group_counts,
    hash64,
    indices,
    is_in,
    repeats,
)
from dpoflow.tasks.partitions import Budget, Partitions, partition_count

# Row status codes in the accumulator (0 = accepted).
OK, INVALID, DUP, DUP_QUARANTINED, RATE_CAP, UNIFORM, BURST = range(7)
ABUSE_REASONS = {RATE_CAP: "abuse: rate cap", UNIFORM: "abuse: uniform voter", BURST: "abuse: burst"}


@dataclass
class Outcome:
    status: np.ndarray  # per merged row (arrival order): OK, INVALID, DUP, DUP_QUARANTINED or an abuse code
    signals: pa.Table | None
    propensities: dict[int, float]
    as_of: dt.datetime | None
    counts: dict[str, int] = field(default_factory=dict)


# The per-event state, filed twice: event-id hashes partitioned by event id for exactly-once,
# and the rest partitioned by user for the abuse filters and the votes (every event of a user
# is in one partition). `row` numbers every row merged (valid or not) in arrival order and
# links the two; `uh` is the user id's hash.
_BY_ID = {"row": np.int64, "eh": np.uint64, "new": np.bool_}
_BY_USER = {"row": np.int64, "uh": np.uint64, "resp": np.int32, "etype": np.int8, "ts": np.int64,
            "value": np.float64, "pos": np.int32, "rand": np.bool_}


@dataclass
class Compact:
    """One batch's valid rows as compact columns, already split into partitions (by event id
    and by user). Built without shared state, so worker threads prepare batches in parallel;
    `merge` then takes them in arrival order."""

    n_rows: int  # rows of the batch, valid or not (row numbers count them all)
    by_id: list[tuple[int, dict[str, np.ndarray]]]  # (partition, _BY_ID columns but `new`); `row` within the batch
    by_user: list[tuple[int, dict[str, np.ndarray]]]  # (partition, _BY_USER columns)
    resp_dict: tuple[pa.Array, np.ndarray, np.ndarray] | None = None  # `resp` = indices into this dictionary


class EventAccumulator:
    """The compact state (hashes, codes, ts, value, position) of every valid event of the run,
    hash-partitioned and spilled to scratch files past `state_memory_mb` (tasks/partitions.py).

    `merge` only files batches away; `abuse` then decides exactly-once per event-id partition
    (the first occurrence wins) and runs the abuse filters per user partition, and `signals`
    counts the votes per user partition; partitions are worked on by two threads."""

    def __init__(self, cfg: IngestConfig, scratch: Path | None = None, expected_rows: int = 0) -> None:
        self.cfg = cfg
        self.types = list(cfg.event_weights)
        self.type_code = {t: i for i, t in enumerate(self.types)}
        self.rules = VoteRules.from_config(cfg)
        self.responses = Codes()
        self.blocked: np.ndarray = np.zeros(0, np.uint64)  # hashes of event ids quarantined as abuse before
        self.dropped = Counter()  # new rows dropped as duplicates: DUP / DUP_QUARANTINED
        self.candidates = 0
        self.n_rows = 0
        self.budget = Budget(cfg.state_memory_mb << 20, scratch)
        k = partition_count(expected_rows, cfg.partition_rows)
        self.by_id = Partitions(k, _BY_ID, self.budget)
        self.by_user = Partitions(k, _BY_USER, self.budget)
        self._fin: tuple[np.ndarray, int, dict[int, float]] | None = None

    def close(self) -> None:
        """Remove spill files (also done when the state is consumed)."""
        self.budget.close()

    def preload(self, candidate_ids: pa.Array) -> None:
        """Response codes = index in `candidate_ids` (distinct), as `validate` computes them
        for its orphan check: batches then need no response encoding of their own."""
        self.responses.preload(candidate_ids)
        self.candidates = len(candidate_ids)

    def prepare(self, typed: pa.Table, response_codes: np.ndarray | None = None,
                valid: np.ndarray | None = None) -> Compact:
        """Compact columns of typed rows (FEEDBACK_EVENTS columns), only the `valid` ones (the
        Arrow columns are not filtered: that would copy every string). Thread-safe: reads no
        state that `merge` changes."""
        n = typed.num_rows
        rows = None if valid is None or valid.all() else np.flatnonzero(valid)  # the split takes these
        et = typed.column("event_type").combine_chunks()
        et = et if pa.types.is_dictionary(et.type) else pc.dictionary_encode(et)
        dcodes = np.array([self.type_code.get(v, -1) for v in et.dictionary.to_pylist()] + [-1], np.int8)
        var = typed.column("variant")
        uh = hash64(typed.column("user_id"))
        cols = {
            "uh": uh, "etype": dcodes[indices(et, len(dcodes) - 1)],  # invalid rows too (the split drops them)
            "ts": pc.fill_null(typed.column("ts").combine_chunks().cast(pa.int64()), 0).to_numpy(),
            "value": pc.fill_null(typed.column("value"), np.nan).to_numpy().astype(np.float64, copy=False),
            "pos": pc.fill_null(typed.column("position"), -1).to_numpy().astype(np.int32, copy=False),
            "rand": (np.asarray(pc.fill_null(pc.equal(var, self.cfg.randomised_variant), False).to_numpy(), bool)
                     if var.null_count < len(var) else np.zeros(n, bool)),
        }
        resp_dict = None
        if response_codes is not None and self.candidates:
            cols["resp"] = response_codes
        else:
            idx, d, dh, pre = dict_parts(typed.column("response_id").combine_chunks(), self.responses)
            cols["resp"], resp_dict = idx, (d, dh, pre)
        eh = hash64(typed.column("event_id"))
        return Compact(n, self.by_id.split(eh, {"eh": eh}, rows, index="row"),
                       self.by_user.split(uh, cols, rows, index="row"), resp_dict)

    def merge(self, c: Compact, new: bool) -> None:
        """File a prepared batch away (in arrival order: row numbers follow the merges)."""
        codes = self.responses.resolve(*c.resp_dict) if c.resp_dict is not None else None
        for p, cols in c.by_id:
            self.by_id.append(p, {**cols, "row": cols["row"] + self.n_rows, "new": np.full(len(cols["row"]), new)})
        for p, cols in c.by_user:
            resp = cols["resp"] if codes is None else codes[cols["resp"]]
            self.by_user.append(p, {**cols, "row": cols["row"] + self.n_rows, "resp": resp.astype(np.int32, copy=False)})
        self.n_rows += c.n_rows

    def add(self, typed: pa.Table, new: bool) -> None:
        """prepare + merge of valid, typed rows."""
        self.merge(self.prepare(typed), new)

    def finish(self, now_us: int | None = None) -> Outcome:
        """Exactly-once, abuse filters, votes and signals; `status` is per merged row."""
        out = self.abuse(now_us)
        out.signals = self.signals(out)
        return out

    @staticmethod
    def _each(fn: Any, k: int) -> Iterator[Any]:
        """fn(p) for every partition, two at a time (numpy and Arrow release the GIL); results
        come in partition order, with few of them waiting at once."""
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-state") as ex:
            pending: deque[Future] = deque(ex.submit(fn, p) for p in range(min(k, 3)))
            for p in range(3, k + 3):
                yield pending.popleft().result()
                if p < k:
                    pending.append(ex.submit(fn, p))

    def abuse(self, now_us: int | None = None) -> Outcome:
        """Exactly-once and the abuse filters: everything the `feedback_events` output needs
        (`signals` is left None: `signals()` computes it, e.g. in a thread while the events
        are written). `as_of` is never later than `now_us` (the ingest time): one client
        with a clock in the future cannot age every other vote."""
        cfg = self.cfg
        status = np.full(self.n_rows, INVALID, np.int8)
        for dup, blocked in self._each(lambda p: self._dedup(p, status), self.by_id.k):
            self.dropped[DUP] += dup
            self.dropped[DUP_QUARANTINED] += blocked
        parts = list(self._each(lambda p: self._abuse(p, status), self.by_user.k))
        top_ts = max((t for _, t in parts if t is not None), default=None)
        counts = [c for c, _ in parts if len(c)]
        rand_counts = np.zeros(max((len(c) for c in counts), default=0), np.int64)
        for c in counts:
            rand_counts[:len(c)] += c
        props = self._propensities(rand_counts)
        as_of_us = int(cfg.as_of.timestamp() * 1e6) if cfg.as_of else (top_ts if top_ts is not None else 0)
        if now_us is not None:
            as_of_us = min(as_of_us, now_us)
        as_of = dt.datetime.fromtimestamp(as_of_us / 1e6, dt.UTC) if top_ts is not None or cfg.as_of else None
        self._fin = (status, as_of_us, props)
        return Outcome(status, None, props, as_of)

    def _dedup(self, p: int, status: np.ndarray) -> tuple[int, int]:
        """Exactly-once within event-id partition p (which holds every row of its ids): the
        first occurrence wins; a new event whose id was quarantined as abuse before is dropped
        ("already quarantined"). Sets the status of the partition's rows; returns the new rows
        dropped as duplicates and as already quarantined."""
        c = self.by_id.take(p)
        eh, new = c["eh"], c["new"]
        dup = repeats(eh)
        blocked = ~dup & new & is_in(eh, self.blocked) if len(self.blocked) else np.zeros(len(eh), bool)
        status[c["row"]] = np.where(dup, DUP, np.where(blocked, DUP_QUARANTINED, OK)).astype(np.int8)
        return int((dup & new).sum()), int(blocked.sum())

    def _abuse(self, p: int, status: np.ndarray) -> tuple[np.ndarray, int | None]:
        """The abuse filters over user partition p, which holds every valid event of its users
        (prior + new; duplicates too, which the status set by exactly-once leaves out). Returns
        the live randomised positive events per position (for propensities) and the newest live
        timestamp."""
        cfg, ab = self.cfg, self.cfg.abuse
        c = self.by_user.read(p)
        n = len(c["row"])
        if n == 0:
            return np.zeros(0, np.int64), None
        user, nu = dense_codes(c["uh"])
        resp, etype, ts = c["resp"], c["etype"], c["ts"]
        st = np.zeros(n, np.int8)
        kept = status[c["row"]] == OK  # past exactly-once
        live = kept.copy()
        if ab.rate_cap_per_day:
            # only users with more events in total than the daily cap can break it
            heavy = live & (np.bincount(user[live], minlength=nu)[user] > ab.rate_cap_per_day)
            if heavy.any():
                day = ts[heavy] // 86_400_000_000
                key = user[heavy] * np.int64(day.max() - day.min() + 1) + (day - day.min())
                st[np.nonzero(heavy)[0][group_counts(key) > ab.rate_cap_per_day]] = RATE_CAP
                live = kept & (st == OK)
        if ab.uniform_min_responses:
            codes = [self.type_code[t] for t in ab.uniform_types if t in self.type_code]
            vote = live & np.isin(etype, codes)
            vote &= np.bincount(user[vote], minlength=nu)[user] >= ab.uniform_min_responses
            if vote.any():
                T = len(self.types)
                has_type = np.bincount(user[vote].astype(np.int64) * T + etype[vote],
                                       minlength=nu * T).reshape(nu, T) > 0
                one_type = has_type.sum(axis=1) == 1
                vote &= one_type[user]  # distinct responses are only counted for single-type voters (few)
                R = max(self.responses.size, 1)
                pairs = distinct(user[vote] * np.int64(R) + resp[vote])
                bad_users = one_type & (np.bincount(pairs // R, minlength=nu) >= ab.uniform_min_responses)
                st[live & bad_users[user]] = UNIFORM
                live = kept & (st == OK)
        if ab.burst_max_events:
            cand = live & (np.bincount(user[live], minlength=nu)[user] > ab.burst_max_events)
            if cand.any():
                w = int(ab.burst_window_s * 1e6)
                t0 = ts[cand].min()
                flag = np.zeros(n, bool)
                for off in (0, w // 2):
                    b = (ts[cand] - t0 + off) // w
                    key = user[cand] * np.int64(b.max() + 1) + b
                    flag[np.nonzero(cand)[0][group_counts(key) > ab.burst_max_events]] = True
                st[flag] = BURST
                live = kept & (st == OK)
        flagged = kept & ~live
        if flagged.any():
            status[c["row"][flagged]] = st[flagged]
        counts = np.zeros(0, np.int64)
        if cfg.estimate_propensities:
            pos_types = [self.type_code[t] for t, w in cfg.event_weights.items() if w > 0]
            m = live & c["rand"] & (c["pos"] >= 0) & np.isin(etype, pos_types)
            if m.any():
                counts = np.bincount(c["pos"][m])
        return counts, (int(ts[live].max()) if live.any() else None)

    def _propensities(self, counts: np.ndarray) -> dict[int, float]:
        """Configured table, or p_k = c_k / max c from randomised traffic (positive events only).

        With randomised positions every response is equally likely at every position, so the
        positive-event count at position k is proportional to its examination propensity."""
        cfg = self.cfg
        props = {int(k): float(v) for k, v in cfg.propensities.items()}
        if cfg.estimate_propensities and len(counts):
            ok = counts >= cfg.min_randomised_events
            if ok.any():
                top = counts[ok].max()
                props.update({int(k): float(counts[k] / top) for k in np.nonzero(ok)[0]})
        return dict(sorted(props.items()))

    def signals(self, outcome: Outcome) -> pa.Table:
        """One vote per user per (response, vote group), then the per-response signals
        (tasks/feedback/signals.py): the per-partition sums are added up in partition order."""
        status, as_of_us, props = self._fin
        self._fin = None
        ipw = ipw_per_position(props, self.cfg.min_propensity)
        sums = VoteSums.zeros(self.responses.size)
        for part in self._each(lambda p: self._votes(p, status, as_of_us, ipw), self.by_user.k):
            if part is not None:
                sums.add(part)
        self.budget.close()
        return signals_table(sums, self.responses.known, self.cfg)

    def _votes(self, p: int, status: np.ndarray, as_of_us: int, ipw: np.ndarray | None) -> VoteSums | None:
        """User partition p's live events -> per-response vote sums. Users do not span
        partitions, so the sums add up across partitions."""
        c = self.by_user.take(p)
        live = status[c["row"]] == OK
        if not live.all():
            c = {k: v[live] for k, v in c.items()}
        if not len(c["row"]):
            return None
        return partition_votes(c, self.rules, self.responses.size, as_of_us, ipw, self.cfg)
