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

The reward model is the expensive part, so it runs in shards of `reward.shard_size`
candidates (rows of the pinned candidates version), the same way here (`runner: inline`)
or on Ray workers (`runner: ray`, driven by the flow): a shard is a small picklable spec,
the worker opens the store, reads only its rows, scores them and commits its rewards once
(``shard_reward_<key>``), so a rerun reuses finished shards and the scores do not depend on
where a shard ran. No Prefect or Ray here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dpoflow.storage.schemas import SCORES
from dpoflow.tasks.code_version import code_version
from dpoflow.tasks.contract import Section, StageContext, StageResult
from dpoflow.tasks.metrics import fast
from dpoflow.tasks.reward import RewardConfig, score_rewards
from dpoflow.tasks.rules import FLAGS, RulesConfig, check

if TYPE_CHECKING:
    from dpoflow.storage.store import DatasetStore

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
    runner: Literal["inline", "ray"] = Field(
        "inline", description="where reward shards run: inline (this process, one after the other) or ray (each "
        "shard a Prefect task run on a Ray worker; see the ray section); the rewards are the same")

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


def score_table(candidates: pa.Table, prompts: pa.Table | None, cfg: ScoreConfig,
                rewards: np.ndarray | None = None) -> tuple[pa.Table, dict]:
    """Score candidates (pure function: tables in, SCORES table + report out). `rewards`, when
    given, are the reward shards' results (the stage gathers them); else the reward model,
    if configured, runs here in the same shards."""
    n = candidates.num_rows
    report: dict[str, Any] = {"rows_in": n}
    refs, ref_report = references_for(candidates, prompts)
    report.update(ref_report)
    prompt_text, response, bad_utf8 = reward_inputs(candidates)
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
    if rewards is not None:
        if len(rewards) != n:
            raise ValueError(f"score: {len(rewards)} rewards for {n} candidates")
        cols["reward"] = np.asarray(rewards, dtype=np.float64)
    elif cfg.reward.model:
        cols["reward"] = sharded_rewards(prompt_text.to_pylist(), response.to_pylist(), cfg.reward)
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


# --- reward shards ---------------------------------------------------------------------------

REWARD_SHARD = pa.schema([("candidate_id", pa.string()), ("reward", pa.float64())])


def reward_inputs(candidates: pa.Table) -> tuple[pa.Array, pa.Array, int]:
    """(prompt, response, rows repaired): the texts the rules and the reward model see,
    valid UTF-8 (the same here and on a worker, so a shard's rewards match an inline run)."""
    response, bad = repair_utf8(_combine(candidates.column("response")))
    prompt = (repair_utf8(_combine(candidates.column("prompt")))[0] if "prompt" in candidates.column_names
              else pa.nulls(candidates.num_rows, pa.string()))
    return prompt, response, bad


def sharded_rewards(prompts: list[str | None], responses: list[str | None], cfg: RewardConfig) -> np.ndarray:
    """score_rewards over consecutive `shard_size` chunks: the batches a sharded run makes."""
    n = len(responses)
    parts = [score_rewards(prompts[a:a + cfg.shard_size], responses[a:a + cfg.shard_size], cfg)
             for a in range(0, n, cfg.shard_size)]
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(frozen=True)
class RewardShardSpec:
    """One reward shard as plain data: rows [start, stop) of a pinned candidates version."""

    label: str  # reward-<chunk>, the Prefect task run's name
    name: str  # dataset its rewards are committed as
    store_root: str
    store_options: tuple[tuple[str, str], ...]  # non-secret store settings; keys come from the worker's env
    candidates_ref: str  # pinned name@version
    start: int
    stop: int
    reward: dict[str, Any]  # RewardConfig as JSON
    device: str  # resolved on the driver (cpu | cuda | cuda:N); part of the shard key
    flow_run_id: str | None = None
    reuse: bool = True  # False (a forced run): recompute a shard that is already committed

    @property
    def n_rows(self) -> int:
        return self.stop - self.start


def reward_specs(store: DatasetStore, candidates_ref: str, n_rows: int, cfg: RewardConfig, device: str, *,
                 flow_run_id: str | None = None, reuse: bool = True) -> list[RewardShardSpec]:
    """The reward shards of a candidates version, each named by a key of what its rewards
    depend on (rows, reward config, device, code)."""
    from dpoflow.tasks.shards import travelling_options

    config = cfg.model_dump(mode="json")
    code = code_version(__name__)
    specs = []
    for k, start in enumerate(range(0, n_rows, cfg.shard_size)):
        stop = min(start + cfg.shard_size, n_rows)
        key = hashlib.sha256(json.dumps({"candidates": candidates_ref, "rows": [start, stop], "reward": config,
                                         "device": device, "code": code}, sort_keys=True).encode()).hexdigest()[:24]
        specs.append(RewardShardSpec(f"reward-{k:04d}", f"shard_reward_{key}", store.root,
                                     travelling_options(store.options), candidates_ref, start, stop, config, device,
                                     flow_run_id, reuse))
    return specs


def read_rows(store: DatasetStore, ref: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    """Rows [start, stop) of a version in the order `store.read` gives, reading only the
    Parquet row groups that hold them (a worker never loads the whole candidates table)."""
    ds = store.dataset(ref)
    parts, pos = [], 0
    for frag in ds.get_fragments():
        if pos >= stop:
            break
        for rg in frag.row_groups:
            if pos + rg.num_rows > start and pos < stop:
                t = frag.subset(row_group_ids=[rg.id]).to_table(schema=ds.schema, columns=columns)
                lo = max(start - pos, 0)
                parts.append(t.slice(lo, min(stop, pos + rg.num_rows) - pos - lo))
            pos += rg.num_rows
    return pa.concat_tables(parts) if parts else ds.schema.empty_table().select(columns)


def run_reward_spec(spec: RewardShardSpec) -> dict[str, Any]:
    """The worker entry point: reuse the committed shard or score its rows and commit them.
    Returns a small dict (the dataset ref, counters, where it ran), never the rewards."""
    from dpoflow.tasks.shards import commit_shard, open_store, reused_shard, worker_identity

    store = open_store(spec)  # type: ignore[arg-type]  # needs only store_root / store_options
    if spec.reuse and store.exists(spec.name):
        return reused_shard(store, spec.name)
    cfg = RewardConfig.model_validate(spec.reward).model_copy(update={"device": spec.device})
    names = store.dataset(spec.candidates_ref).schema.names
    rows = read_rows(store, spec.candidates_ref, spec.start, spec.stop,
                     [c for c in ("candidate_id", "prompt", "response") if c in names])
    if rows.num_rows != spec.n_rows:
        raise LookupError(f"reward shard {spec.label}: {rows.num_rows} rows of {spec.candidates_ref} "
                          f"[{spec.start}, {spec.stop})")
    prompt, response, _ = reward_inputs(rows)
    t0 = time.perf_counter()
    rewards = score_rewards(prompt.to_pylist(), response.to_pylist(), cfg)
    table = pa.table({"candidate_id": rows.column("candidate_id"), "reward": rewards}, schema=REWARD_SHARD)
    extra = {"rows": rows.num_rows, "seconds": round(time.perf_counter() - t0, 4), "label": spec.label,
             **worker_identity()}
    return commit_shard(store, spec.name, table, reuse=spec.reuse, extra=extra, schema=REWARD_SHARD,
                        parents=[spec.candidates_ref], stage="score", flow_run_id=spec.flow_run_id)


RewardRunner = Callable[[Sequence[RewardShardSpec], Callable[[int], None]],
                        Iterable[tuple[RewardShardSpec, dict[str, Any]]]]


def inline_reward_runner(specs: Sequence[RewardShardSpec], on_batch: Callable[[int], None]
                         ) -> Iterable[tuple[RewardShardSpec, dict[str, Any]]]:
    """One shard after the other in this process (the model stays loaded)."""
    for spec in specs:
        yield spec, run_reward_spec(spec)


def gather_rewards(ctx: StageContext, candidates: pa.Table, cfg: ScoreConfig, runner: RewardRunner,
                   device: str, reuse: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Run every reward shard of the pinned candidates and put their rewards in row order;
    each shard's candidate ids must be the driver's rows (else the read order differs)."""
    specs = reward_specs(ctx.store, ctx.inputs["candidates"], candidates.num_rows, cfg.reward, device,
                         flow_run_id=ctx.flow_run_id, reuse=reuse)
    by_name = {spec.name: info for spec, info in runner(specs, lambda _k: None)}
    missing = [s.label for s in specs if s.name not in by_name]
    if missing:
        raise RuntimeError(f"score: {len(missing)} reward shards did not finish: {', '.join(missing[:5])}")
    ids = _combine(candidates.column("candidate_id"))
    out = np.full(candidates.num_rows, np.nan)
    for spec in specs:
        part = ctx.store.read(by_name[spec.name]["ref"])
        if not part.column("candidate_id").equals(pa.chunked_array([ids.slice(spec.start, spec.n_rows)])):
            raise RuntimeError(f"score: reward shard {spec.label} holds other candidates than rows "
                               f"[{spec.start}, {spec.stop}) of {ctx.inputs['candidates']}")
        out[spec.start:spec.stop] = part.column("reward").to_numpy(zero_copy_only=False)
    reused = sum(1 for i in by_name.values() if i.get("reused"))
    return out, {"reward_shards": len(specs), "reward_shards_reused": reused, "reward_device": device}


def make_score_stage(runner: RewardRunner | None = None, device: str | None = None, reuse_shards: bool = True
                     ) -> Callable[[StageContext], StageResult]:
    """The stage function for the runner: reward shards go to `runner` (default: inline)
    on `device` (the workers' device when they run elsewhere; default: resolved here)."""

    def score(ctx: StageContext) -> StageResult:
        return score_stage(ctx, runner=runner, device=device, reuse_shards=reuse_shards)

    return score


def score_stage(ctx: StageContext, *, runner: RewardRunner | None = None, device: str | None = None,
                reuse_shards: bool = True) -> StageResult:
    """candidates (+ prompts) -> scores; the reward model's part runs as shards."""
    cfg: ScoreConfig = ctx.config
    candidates = ctx.read("candidates")
    prompts = ctx.read("prompts") if ctx.has("prompts") else None
    rewards, shard_report = None, {}
    if cfg.reward.model:
        from dpoflow.tasks.reward import resolve_device

        rewards, shard_report = gather_rewards(ctx, candidates, cfg, runner or inline_reward_runner,
                                               device or resolve_device(cfg.reward.device), reuse_shards)
    table, report = score_table(candidates, prompts, cfg, rewards=rewards)
    report.update(shard_report)
    ctx.logger.info("score: %d candidates, %d without reference, %d truncated, flags %s%s",
                    table.num_rows, report["no_reference"], report["truncated"], report["flagged"],
                    f"; {shard_report['reward_shards_reused']}/{shard_report['reward_shards']} reward shards reused"
                    if shard_report else "")
    return StageResult(outputs={"scores": table}, report=report)


def score(ctx: StageContext) -> StageResult:
    """Stage function for flows.runner.run_stage: candidates (+ prompts) -> scores."""
    return score_stage(ctx)
