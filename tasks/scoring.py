"""The `score` stage: metrics against references, rule flags, reward, composite auto_score.

Inputs: role `candidates` (CANDIDATES) and, optionally, `prompts` (PROMPTS) for the
references (`reference` and/or `references`, merged, blanks dropped, de-duplicated).
Output: `scores` (SCORES), one row per candidate.

Results for bad input (also in the report):
* no reference for the prompt (or prompt unknown)  -> bleu / rouge* / extra metrics null
* null prediction (CLI) -> metrics null; empty prediction -> metrics 0 and flag_empty
* texts longer than `max_chars` -> metrics and repetition use the first `max_chars`
  characters (report: `truncated`); rules and reward see the full text
* invalid UTF-8 -> bytes replaced by U+FFFD before scoring (report: `invalid_utf8`)
* emoji / mixed scripts -> see the tokenization rule in :mod:`dpoflow.tasks.metrics.tokenize`
auto_score = weighted mean of the available components (bleu/100, rouge*, reward through
a sigmoid, extra metrics) minus the penalties of the raised flags; null when no component
with a weight is available (no reference and no reward).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dpoflow.storage.schemas import SCORES
from dpoflow.tasks.contract import Section, StageResult
from dpoflow.tasks.metrics import fast
from dpoflow.tasks.reward import RewardConfig, score_rewards
from dpoflow.tasks.rules import FLAGS, RulesConfig, check

log = logging.getLogger("dpoflow.score")


class ExtraMetric(Section):
    path: str = Field(..., description="`evaluate` metric: a name on the Hub (e.g. bertscore) or a local script / folder")
    key: str | None = Field(None, description="key of the result to store (default: the metric name, else the only key)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for compute()")
    per_row: bool = Field(False, description="call compute once per candidate (for metrics that only return an aggregate)")


class AutoScoreConfig(Section):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"bleu": 0.25, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.25, "reward": 0.5},
        description="weights of components: bleu (scaled to 0-1), rouge1, rouge2, rougeL, reward, or an extra metric name")
    penalties: dict[str, float] = Field(
        default_factory=lambda: {"flag_safety": 1.0, "flag_pii": 0.5, "flag_repetition": 0.3, "flag_length": 0.1,
                                 "flag_refusal": 0.3, "flag_language": 0.3, "flag_empty": 1.0, "flag_encoding": 1.0},
        description="subtracted from auto_score when the flag is raised")
    reward_transform: str = Field("sigmoid", description="sigmoid | raw: how the reward enters the weighted mean")

    @field_validator("penalties")
    @classmethod
    def _flags(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - set(FLAGS)
        if bad:
            raise ValueError(f"unknown flag(s) {sorted(bad)}; flags: {', '.join(FLAGS)}")
        return v

    @field_validator("reward_transform")
    @classmethod
    def _transform(cls, v: str) -> str:
        if v not in ("sigmoid", "raw"):
            raise ValueError("reward_transform must be 'sigmoid' or 'raw'")
        return v


class ScoreConfig(Section):
    metrics: list[str] = Field(default_factory=lambda: ["bleu", "rouge"], description="built-in metrics: bleu, rouge (ROUGE-1/2/L)")
    use_stemmer: bool = Field(False, description="ROUGE: Porter-stem English words (as rouge_score use_stemmer)")
    bleu_smooth_method: str = Field("exp", description="BLEU smoothing: exp (sacrebleu sentence_bleu default), floor, add-k, none")
    bleu_smooth_value: float | None = Field(None, description="value for floor / add-k smoothing (default 0.1 / 1)")
    bleu_lowercase: bool = Field(False, description="BLEU: lowercase before tokenizing")
    max_chars: int = Field(20_000, ge=1, description="texts longer than this are cut to it for metrics (counted in the report)")
    workers: int | None = Field(None, ge=1, description="threads for the metric fast path (default: all cores)")
    extra_metrics: dict[str, ExtraMetric] = Field(default_factory=dict, description="name -> other `evaluate` metric, stored in the extra_metrics map column")
    rules: RulesConfig = Field(default_factory=RulesConfig, description="rule checks")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="optional reward model")
    auto_score: AutoScoreConfig = Field(default_factory=AutoScoreConfig, description="composite score")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        bad = set(v) - set(fast.BUILTIN_METRICS)
        if bad:
            raise ValueError(f"unknown built-in metric(s) {sorted(bad)}: use {list(fast.BUILTIN_METRICS)}; "
                             "other `evaluate` metrics go in extra_metrics")
        return v

    @field_validator("bleu_smooth_method")
    @classmethod
    def _smooth(cls, v: str) -> str:
        if v not in fast.SMOOTH_DEFAULTS:
            raise ValueError(f"use one of {list(fast.SMOOTH_DEFAULTS)}")
        return v


# --- helpers -------------------------------------------------------------------------------


def _combine(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    return col


def repair_utf8(arr: pa.Array) -> tuple[pa.Array, int]:
    """Valid UTF-8 strings: invalid byte sequences become U+FFFD; returns (array, rows repaired)."""
    arr = _combine(arr)
    try:
        arr.validate(full=True)
        return arr, 0
    except pa.ArrowInvalid:
        pass
    raw = arr.view(pa.binary()) if pa.types.is_string(arr.type) else arr.cast(pa.binary())
    fixed, bad = [], 0
    for b in raw.to_pylist():  # slow path, only for arrays that failed validation
        if b is None:
            fixed.append(None)
            continue
        try:
            fixed.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            fixed.append(b.decode("utf-8", errors="replace"))
            bad += 1
    return pa.array(fixed, pa.string()), bad


def cap_chars(arr: pa.Array, max_chars: int) -> tuple[pa.Array, int]:
    """Cut texts to `max_chars` characters; returns (array, number cut)."""
    long_ = pc.fill_null(pc.greater(pc.utf8_length(arr), max_chars), False)
    n = pc.sum(long_).as_py() or 0
    return (pc.utf8_slice_codeunits(arr, 0, max_chars) if n else arr), n


def references_for(candidates: pa.Table, prompts: pa.Table | None) -> tuple[pa.Array, dict[str, int]]:
    """list<string> of references per candidate (prompt `references` + `reference`, deduped, blanks dropped)."""
    n = candidates.num_rows
    report = {"duplicate_prompt_ids": 0}
    if prompts is None or prompts.num_rows == 0:
        return pa.nulls(n, pa.list_(pa.string())), report
    pid = _combine(prompts.column("prompt_id"))
    # keep the first row of each prompt_id
    codes = pc.dictionary_encode(pid).indices.to_numpy(zero_copy_only=False)
    _, first_idx = np.unique(codes, return_index=True)
    report["duplicate_prompt_ids"] = int(len(pid) - len(first_idx))
    prompts = prompts.take(pa.array(np.sort(first_idx)))
    pid = _combine(prompts.column("prompt_id"))
    rows, vals = [], []
    if "references" in prompts.column_names:
        lists = _combine(prompts.column("references"))
        if not pa.types.is_null(lists.type):
            rows.append(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64))
            vals.append(pc.list_flatten(lists).cast(pa.string()))
    if "reference" in prompts.column_names:
        single = _combine(prompts.column("reference"))
        rows.append(np.arange(len(single), dtype=np.int64))
        vals.append(single.cast(pa.string()))
    if not rows:
        return pa.nulls(n, pa.list_(pa.string())), report
    r = np.concatenate(rows)
    v = pa.concat_arrays(vals)
    keep = pc.fill_null(pc.not_equal(pc.utf8_trim(pc.fill_null(v, ""), characters=" \t\r\n"), ""), False)
    r, v = r[keep.to_numpy(zero_copy_only=False)], v.filter(keep)
    # dedupe (row, text)
    key = pc.binary_join_element_wise(pa.array(r.astype(str)), v, "\x1f")
    kcodes = pc.dictionary_encode(key).indices.to_numpy(zero_copy_only=False)
    _, uniq_idx = np.unique(kcodes, return_index=True)
    uniq_idx = np.sort(uniq_idx)
    r, v = r[uniq_idx], v.take(pa.array(uniq_idx))
    order = np.argsort(r, kind="stable")
    r, v = r[order], v.take(pa.array(order))
    offsets = np.zeros(prompts.num_rows + 1, dtype=np.int32)
    np.cumsum(np.bincount(r, minlength=prompts.num_rows), out=offsets[1:])
    per_prompt = pa.ListArray.from_arrays(pa.array(offsets), v)
    pos = pc.index_in(_combine(candidates.column("prompt_id")), value_set=pid)
    return per_prompt.take(pos), report


def extra_metric_values(name: str, spec: ExtraMetric, preds: list[str], refs: list[list[str]]) -> np.ndarray:
    """Per-row values of another `evaluate` metric (rows given here all have references)."""
    from dpoflow.tasks.metrics import load_metric

    metric = load_metric(spec.path)
    n = len(preds)
    out = np.full(n, np.nan)
    if n == 0:
        return out

    def pick(res: dict) -> Any:
        key = spec.key or (name if name in res else (next(iter(res)) if len(res) == 1 else None))
        if key is None or key not in res:
            raise KeyError(f"extra metric {name!r}: result keys {sorted(res)}; set `key`")
        return res[key]

    if not spec.per_row:
        val = pick(metric.compute(predictions=preds, references=refs, **spec.kwargs))
        if isinstance(val, (list, tuple, np.ndarray)) and len(val) == n:
            return np.array([np.nan if x is None else float(x) for x in val])
        log.warning("extra metric %s returned an aggregate; computing it once per candidate", name)
    for i in range(n):
        out[i] = float(pick(metric.compute(predictions=[preds[i]], references=[refs[i]], **spec.kwargs)))
    return out


def _auto_score(cols: dict[str, np.ndarray], flags: pa.Table, cfg: AutoScoreConfig) -> np.ndarray:
    n = flags.num_rows
    num, den = np.zeros(n), np.zeros(n)
    for comp, w in cfg.weights.items():
        if w == 0 or comp not in cols:
            continue
        x = cols[comp]
        if comp == "bleu":
            x = x / 100.0
        elif comp == "reward" and cfg.reward_transform == "sigmoid":
            x = 1.0 / (1.0 + np.exp(-x))
        ok = ~np.isnan(x)
        num[ok] += w * x[ok]
        den[ok] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        base = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    for flag, p in cfg.penalties.items():
        base = base - p * flags.column(flag).to_numpy(zero_copy_only=False).astype(float)
    return base


# --- the stage -----------------------------------------------------------------------------


def score_table(candidates: pa.Table, prompts: pa.Table | None, cfg: ScoreConfig) -> tuple[pa.Table, dict]:
    """Score candidates (pure function: tables in, SCORES table + report out)."""
    n = candidates.num_rows
    report: dict[str, Any] = {"rows_in": n}
    refs, ref_report = references_for(candidates, prompts)
    report.update(ref_report)
    response, bad_utf8 = repair_utf8(_combine(candidates.column("response")))
    prompt_text = (repair_utf8(_combine(candidates.column("prompt")))[0]
                   if "prompt" in candidates.column_names else pa.nulls(n, pa.string()))
    report["invalid_utf8"] = bad_utf8
    capped, n_cut = cap_chars(response, cfg.max_chars)
    ref_lens = pc.list_value_length(refs)
    has_ref = pc.fill_null(pc.greater(ref_lens, 0), False).to_numpy(zero_copy_only=False)
    report["no_reference"] = int(n - has_ref.sum())
    flat = pc.list_flatten(refs)
    flat_capped, n_cut_refs = cap_chars(repair_utf8(flat)[0], cfg.max_chars) if len(flat) else (flat, 0)
    report["truncated"] = int(n_cut + n_cut_refs)
    refs_capped = pa.ListArray.from_arrays(refs.offsets, flat_capped, mask=pc.is_null(refs)) if len(flat) else refs

    cols: dict[str, np.ndarray] = {}
    if cfg.metrics:
        cols.update(fast.compute(capped, refs_capped, cfg.metrics, smooth_method=cfg.bleu_smooth_method,
                                 smooth_value=cfg.bleu_smooth_value, lowercase=cfg.bleu_lowercase,
                                 use_stemmer=cfg.use_stemmer, workers=cfg.workers))
    extra: dict[str, np.ndarray] = {}
    if cfg.extra_metrics:
        idx = np.flatnonzero(has_ref)
        preds = capped.take(pa.array(idx)).to_pylist()
        rl = refs_capped.take(pa.array(idx)).to_pylist()
        for name, spec in cfg.extra_metrics.items():
            vals = np.full(n, np.nan)
            vals[idx] = extra_metric_values(name, spec, preds, rl)
            extra[name] = vals
    if cfg.reward.model:
        cols["reward"] = score_rewards(prompt_text.to_pylist(), response.to_pylist(), cfg.reward)
    flags = check(prompt_text, response, cfg.rules, max_chars=cfg.max_chars)
    auto = _auto_score({**cols, **extra}, flags, cfg.auto_score)

    out = {"candidate_id": candidates.column("candidate_id"), "prompt_id": candidates.column("prompt_id")}
    for key in ("bleu", "rouge1", "rouge2", "rougeL", "reward"):
        out[key] = fast.to_arrow(cols[key]) if key in cols else pa.nulls(n, pa.float64())
    for f in FLAGS + ("flag_reasons",):
        out[f] = flags.column(f)
    out["extra_metrics"] = _extra_column(extra, n)
    out["auto_score"] = fast.to_arrow(auto)
    report["flagged"] = {f: int(pc.sum(flags.column(f)).as_py() or 0) for f in FLAGS}
    return pa.table(out).select(SCORES.names), report


def _extra_column(extra: dict[str, np.ndarray], n: int) -> pa.Array:
    typ = pa.map_(pa.string(), pa.float64())
    if not extra:
        return pa.nulls(n, typ)
    names = list(extra)
    vals = np.stack([extra[k] for k in names], axis=1)  # (n, k)
    keep = ~np.isnan(vals)
    counts = keep.sum(axis=1)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    keys = pa.array(np.broadcast_to(np.array(names, dtype=object), vals.shape)[keep], pa.string())
    items = pa.array(vals[keep], pa.float64())
    return pa.MapArray.from_arrays(pa.array(offsets), keys, items, mask=pa.array(counts == 0))


def score(ctx) -> Any:
    """Stage function for flows.stage.run_stage: candidates (+ prompts) -> scores."""

    cfg: ScoreConfig = ctx.config
    candidates = ctx.read("candidates")
    prompts = ctx.read("prompts") if ctx.has("prompts") else None
    table, report = score_table(candidates, prompts, cfg)
    ctx.logger.info("score: %d candidates, %d without reference, %d truncated, flags %s",
                    table.num_rows, report["no_reference"], report["truncated"], report["flagged"])
    return StageResult(outputs={"scores": table}, report=report)
