"""The `sample` stage: candidate responses to every prompt, from one or more samplers.

prompts@V (+ served@W) -> candidates

* Each sampler names a model (local folder, ``hf:org/name`` / ``org/name`` hub id, or a
  registry ref such as ``models@production``), generation parameters and a temperature /
  top-p / top-k grid; every grid point yields `n` candidates per prompt. `share` < 1 gives
  the sampler a stable, hash-chosen subset of the prompts.
* All models are resolved before any work, so a wrong path fails in a second, not after
  an hour of sampling with the first sampler.
* Work is split into shards (sampler x chunk of prompts). A finished shard is committed to
  the store as its own dataset (``shard_sample_<key>``; the key covers the prompts version,
  the shard's prompt ids, the sampler, the resolved model version, the device and the code),
  so a rerun after a crash finds it and redoes only the unfinished shards. Sampling is
  seeded per candidate (see tasks.generation), so the rerun gives the same result as an
  uninterrupted run.
* Bad prompts (empty, non-UTF-8, duplicate ids, too long for a sampler's model) go to
  quarantine with a reason; identical responses to one prompt are kept once with
  `dup_count`. Served responses (what users saw) join as ``origin="served"`` candidates
  whose candidate_id is their response_id, so feedback events join on it.

Shards travel as specs (tasks.shards): the driver plans them, a runner runs them (here,
one after the other; or, from the flow, as Prefect tasks here or on a Ray cluster) and the
driver gathers the committed shard datasets. No Prefect here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from dpoflow.storage.registry import is_registry_ref
from dpoflow.storage.schemas import CANDIDATES, QUARANTINE
from dpoflow.tasks import generation as gen
from dpoflow.tasks import shards
from dpoflow.tasks.code_version import code_version
from dpoflow.tasks.contract import Section, StageContext, StageResult
from dpoflow.tasks.ids import stable_id
from dpoflow.tasks.shards import ShardRunner, ShardSpec, travelling_options

log = logging.getLogger("dpoflow.sample")


# --- config ------------------------------------------------------------------------------------

def _as_list(v: Any) -> Any:
    return v if isinstance(v, list) else [v]


class SamplerConfig(Section):
    name: str | None = Field(None, description="label stored in candidates.sampler (default: sampler<i>)")
    model: str = Field("models@production", description="local folder, hub id (hf:org/name or org/name; "
                       "downloaded only because it is named here) or registry ref like models@production")
    n: int = Field(4, ge=1, le=256, description="candidates per prompt for each grid point")
    temperature: list[float] = Field([1.0], description="temperature grid (a number or a list; 0 = greedy)")
    top_p: list[float] = Field([1.0], description="top-p grid (a number or a list, 0 < p <= 1)")
    top_k: list[int] = Field([0], description="top-k grid (a number or a list; 0 = no cut)")
    max_new_tokens: int = Field(128, ge=1, description="longest response in tokens")
    repetition_penalty: float = Field(1.0, gt=0, description="transformers repetition penalty (1 = off)")
    seed: int = Field(0, ge=0, description="base seed; each candidate's seed is derived from it and the prompt id")
    share: float = Field(1.0, gt=0, le=1, description="share of prompts this sampler covers (stable hash subset)")
    trust_remote_code: bool = Field(False, description="allow model repos to run their own Python code")
    allow_pickle_weights: bool = Field(False, description="load .bin / .pt weights too (they can run code "
                                       "when loaded); off: safetensors only, as at registration")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="vllm is used only when installed and a GPU is present (else transformers)")

    _grid = field_validator("temperature", "top_p", "top_k", mode="before")(_as_list)

    @field_validator("top_p")
    @classmethod
    def _check_top_p(cls, v: list[float]) -> list[float]:
        if any(not 0 < p <= 1 for p in v):
            raise ValueError("top_p values must be in (0, 1]")
        return v

    @field_validator("temperature", "top_k")
    @classmethod
    def _check_nonneg(cls, v: list) -> list:
        if not v or any(x < 0 for x in v):
            raise ValueError("grid values must be >= 0 and the grid not empty")
        return v

    def grid(self) -> list[tuple[float, float, int]]:
        return list(itertools.product(self.temperature, self.top_p, self.top_k))


class SampleConfig(Section):
    samplers: list[SamplerConfig] = Field(default_factory=lambda: [SamplerConfig()],
                                          description="one or more samplers; all their candidates are merged")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when a GPU is visible")
    token_budget: int = Field(16384, ge=64, description="max rows x (prompt + new tokens) in one generate batch")
    max_batch_size: int = Field(256, ge=1, description="max prompts in one generate batch")
    shard_size: int = Field(256, ge=1, description="prompts per resumable shard")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt (default: context - max_new_tokens)")
    too_long: Literal["skip", "truncate"] = Field(
        "skip", description="prompts over the limit: skip (quarantined) or keep their last tokens")
    chat_template: Literal["auto", "never"] = Field(
        "auto", description="auto: format prompts with the tokenizer's chat template when it has one")
    dedup: bool = Field(True, description="keep identical (whitespace-normalised) responses to a prompt once")
    progress_bar: bool | None = Field(None, description="tqdm bar; None = only on an interactive terminal")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads on CPU (None = torch default; 1 is "
                                    "often fastest for small models on a busy machine)")
    runner: Literal["inline", "ray"] = Field(
        "inline", description="where shards run: inline (this process, one after the other) or ray (each shard "
        "a Prefect task run on a Ray worker; see the ray section); the candidates are the same")


# --- models ------------------------------------------------------------------------------------

class ModelNotFound(FileNotFoundError):
    """A sampler names a model that cannot be found (raised before any work)."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSpec:
    ref: str  # as configured
    load: str  # what from_pretrained gets
    version: str  # recorded in candidates.model_version
    local_only: bool
    fingerprint: str = ""  # local folders: names, sizes and mtimes of the files (weights changed in place)


def _folder_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve_model(ref: str, registry: Any = None) -> ModelSpec:
    """Where a sampler's model comes from; errors name the sampler's setting and the fix."""
    if is_registry_ref(ref):
        if registry is None:
            raise ModelNotFound(f"model {ref!r} is a registry ref but no registry is available")
        version = registry.version_of(ref)
        path = Path(registry.local_path(ref))
        if not path.is_dir():
            raise ModelNotFound(f"model {ref!r} ({version}) has no files at {path}")
        return ModelSpec(ref, str(path), version, True)
    if ref.startswith("hf:"):
        return ModelSpec(ref, ref[3:], ref[3:], False)
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelNotFound(f"model path {str(p)!r} exists but holds no config.json (not a saved model)")
        return ModelSpec(ref, str(p.resolve()), str(p.resolve()), True, _folder_fingerprint(p))
    if _HUB_ID.match(ref) and not ref.startswith((".", "~")):
        return ModelSpec(ref, ref, ref, False)
    raise ModelNotFound(f"model path {ref!r} does not exist (for a hub model write hf:{ref})")


_MODEL_CACHE: dict[tuple, tuple[Any, Any]] = {}


def _loaded(spec: ModelSpec, device: str, trust: bool, backend: str, allow_pickle: bool = False
            ) -> tuple[Any, Any]:
    """One model held at a time: shards run sampler by sampler, so each loads once."""
    key = (spec.load, device, trust, backend, allow_pickle)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        if backend == "vllm":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec.load, trust_remote_code=trust, local_files_only=spec.local_only)
            from dpoflow.storage.registry import check_weights

            check_weights(spec.load, allow_pickle=allow_pickle)
            _MODEL_CACHE[key] = (gen.load_vllm(spec.load, trust_remote_code=trust), tok)
        else:
            try:
                _MODEL_CACHE[key] = gen.load_model(spec.load, device=device, trust_remote_code=trust,
                                                   local_only=spec.local_only, allow_pickle_weights=allow_pickle)
            except OSError as exc:
                raise ModelNotFound(f"cannot load model {spec.ref!r}: {exc}") from exc
    return _MODEL_CACHE[key]


def release_models() -> None:
    """Drop the cached model (and its GPU memory)."""
    _MODEL_CACHE.clear()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- prompt checks -----------------------------------------------------------------------------

_REPLACEMENT = "\ufffd"


def _bad_utf8_rows(arr: pa.ChunkedArray | pa.Array, parents: np.ndarray | None, n_rows: int) -> np.ndarray:
    """Rows whose text is not valid UTF-8 or holds U+FFFD (text decoded lossily upstream).
    Arrow validates a whole array in C; only a failing array is checked value by value."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    bad = np.zeros(len(arr), dtype=bool)
    try:
        arr.validate(full=True)
        bad |= np.asarray(pc.fill_null(pc.match_substring(arr, _REPLACEMENT), False), dtype=bool)
    except pa.ArrowInvalid:
        for i, b in enumerate(arr.cast(pa.binary()).to_pylist()):
            if b is None:
                continue
            try:
                bad[i] = _REPLACEMENT in b.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
    if parents is None:
        return bad
    out = np.zeros(n_rows, dtype=bool)
    np.logical_or.at(out, parents[bad], True)
    return out


def _quarantine(rows: pa.Table, reasons: list[str], source: str) -> pa.Table:
    now = dt.datetime.now(dt.UTC)
    raws = [json.dumps(r, ensure_ascii=False, default=str) for r in _safe_rows(rows)]
    n = rows.num_rows
    return pa.table({
        "source": [source] * n, "stage": ["sample"] * n, "dataset": ["candidates"] * n,
        "reason": reasons, "raw": raws, "row_index": pa.array(rows.column("_row").to_pylist(), pa.int64()),
        "quarantined_at": pa.array([now] * n, QUARANTINE.field("quarantined_at").type),
    }, schema=QUARANTINE)


def _safe_rows(rows: pa.Table) -> list[dict]:
    """Rows as dicts; text that is not valid UTF-8 is shown with replacement characters."""
    cols = {}
    for name in rows.column_names:
        if name.startswith("_"):
            continue
        col = rows.column(name)
        if pa.types.is_string(col.type):
            col = [None if b is None else b.decode("utf-8", "replace") for b in col.cast(pa.binary()).to_pylist()]
        else:
            try:
                col = col.to_pylist()
            except UnicodeDecodeError:
                col = ["<not valid UTF-8>"] * rows.num_rows
        cols[name] = col
    return [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)] if cols else [{}] * rows.num_rows


def check_prompts(table: pa.Table, source: str = "prompts") -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """Split prompts into usable rows and quarantine rows (empty, non-UTF-8, duplicate id).

    Returns (good rows with a `_row` column = position in the input, quarantine, counts).
    """
    n = table.num_rows
    table = table.append_column("_row", pa.array(np.arange(n, dtype=np.int64)))
    reason = np.full(n, "", dtype=object)
    prompt = table.column("prompt")
    has_msgs = "messages" in table.column_names
    bad = _bad_utf8_rows(prompt, None, n)
    if has_msgs:
        msgs = table.column("messages").combine_chunks()
        flat = pc.list_flatten(msgs)
        parents = np.asarray(pc.list_parent_indices(msgs), dtype=np.int64)
        if len(flat):
            bad |= _bad_utf8_rows(flat.field("content"), parents, n)
    reason[bad] = "non_utf8"
    ok_text = ~bad
    # empty: no non-blank prompt text and no non-blank message content
    blank = np.ones(n, dtype=bool)
    if ok_text.any():
        safe = pc.if_else(pa.array(ok_text), prompt, pa.scalar(None, pa.string()))
        nonblank = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(safe)), 0), False)
        blank &= ~np.asarray(nonblank, dtype=bool)
        if has_msgs and len(flat):
            content = flat.field("content")
            good_flat = ok_text[parents]
            content = pc.if_else(pa.array(good_flat), content, pa.scalar(None, pa.string()))
            nb = np.asarray(pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(content)), 0), False))
            any_nb = np.zeros(n, dtype=bool)
            np.logical_or.at(any_nb, parents[nb], True)
            blank &= ~any_nb
    reason[(reason == "") & blank] = "empty_prompt"
    ids = table.column("prompt_id")
    null_id = np.asarray(pc.is_null(ids), dtype=bool)
    reason[(reason == "") & null_id] = "missing_prompt_id"
    # duplicate prompt ids: the first occurrence is kept
    first = pa.table({"id": ids, "i": pa.array(np.arange(n))}).group_by("id", use_threads=False).aggregate([("i", "min")])
    is_first = np.zeros(n, dtype=bool)
    is_first[np.asarray(first.column("i_min"))] = True
    reason[(reason == "") & ~is_first & ~null_id] = "duplicate_prompt_id"
    keep = reason == ""
    good = table.filter(pa.array(keep))
    rej = table.filter(pa.array(~keep))
    rej_reasons = [str(r) for r in reason[~keep]]
    return good, _quarantine(rej, rej_reasons, source), dict(Counter(rej_reasons))


# --- shards ------------------------------------------------------------------------------------

SHARD = pa.schema([
    ("_row", pa.int64()), ("_sampler", pa.int32()), ("_grid", pa.int32()), ("_ret", pa.int32()),
    ("prompt_id", pa.string()), ("response", pa.string()), ("model_version", pa.string()),
    ("sampler", pa.string()), ("temperature", pa.float32()), ("top_p", pa.float32()), ("top_k", pa.int32()),
    ("seed", pa.int64()), ("n_prompt_tokens", pa.int32()), ("n_tokens", pa.int32()),
    ("finish_reason", pa.string()), ("skip_reason", pa.string()), ("truncated", pa.bool_()),
])


@dataclass
class Shard:
    label: str
    name: str  # dataset name of its finished output
    sampler: int
    rows: np.ndarray  # positions into the checked prompts table


def _code_hash() -> str:
    """The sampling code's version (this module and the core modules it imports)."""
    return code_version(__name__)


def sampler_name(cfg: SampleConfig, i: int) -> str:
    return cfg.samplers[i].name or f"sampler{i}"


def _share_mask(ids: pa.ChunkedArray | pa.Array, salt: str, share: float) -> np.ndarray:
    if share >= 1:
        return np.ones(len(ids), dtype=bool)
    h = stable_id(ids, pa.array([salt] * len(ids)), length=8).to_pylist()
    return np.array([int(x, 16) / 2**32 < share for x in h], dtype=bool)


def plan_shards(prompts_ref: str, good: pa.Table, cfg: SampleConfig, models: list[ModelSpec], device: str
                ) -> list[Shard]:
    """Sampler-major list of shards, each named by a key of everything its output depends on."""
    code = _code_hash()
    shards: list[Shard] = []
    ids = good.column("prompt_id")
    common = {k: v for k, v in cfg.model_dump(mode="json").items()
              if k in ("max_prompt_tokens", "too_long", "chat_template")}
    for s, sc in enumerate(cfg.samplers):
        name = sampler_name(cfg, s)
        rows = np.flatnonzero(_share_mask(ids, name, sc.share))
        for k, start in enumerate(range(0, len(rows), cfg.shard_size)):
            chunk = rows[start:start + cfg.shard_size]
            chunk_ids = pc.take(ids, pa.array(chunk)).to_pylist()
            key = hashlib.sha256(json.dumps({
                "prompts": prompts_ref, "ids": chunk_ids, "rows": chunk.tolist(), "sampler": sc.model_dump(mode="json"),
                "name": name, "model": [models[s].version, models[s].fingerprint], "device": device, "common": common, "code": code,
            }, sort_keys=True).encode()).hexdigest()[:24]
            shards.append(Shard(f"{name}-{k:04d}", f"shard_sample_{key}", s, chunk))
    return shards


def _prompt_inputs(good: pa.Table, rows: np.ndarray) -> tuple[list[Any], list[str], list[int]]:
    """Generation inputs of a shard: chat messages when present, else the prompt text."""
    sub = good.take(pa.array(rows))
    texts = sub.column("prompt").to_pylist()
    msgs = sub.column("messages").to_pylist() if "messages" in sub.column_names else [None] * len(texts)
    return ([m if m else t for t, m in zip(texts, msgs, strict=True)], sub.column("prompt_id").to_pylist(),
            sub.column("_row").to_pylist())


def run_shard(shard: Shard, good: pa.Table, cfg: SampleConfig, spec: ModelSpec, device: str,
              on_batch: Callable[[int], None] | None = None, before_generate: Callable[[int], None] | None = None
              ) -> tuple[pa.Table, gen.GenStats]:
    """Generate one shard: every grid point of its sampler over its prompts."""
    sc = cfg.samplers[shard.sampler]
    name = sampler_name(cfg, shard.sampler)
    backend = "vllm" if sc.backend == "vllm" and gen.vllm_available() else "transformers"
    if sc.backend == "vllm" and backend != "vllm":
        log.warning("sampler %s: vllm is not installed or no GPU is visible; using transformers", name)
    model, tok = _loaded(spec, device, sc.trust_remote_code, backend, sc.allow_pickle_weights)
    prompts, ids, orig_rows = _prompt_inputs(good, shard.rows)
    stats = gen.GenStats()
    cols: dict[str, list] = {f.name: [] for f in SHARD}
    for g, (temp, top_p, top_k) in enumerate(sc.grid()):
        params = gen.GenParams(n=sc.n, temperature=temp, top_p=top_p, top_k=top_k, max_new_tokens=sc.max_new_tokens,
                               repetition_penalty=sc.repetition_penalty, seed=sc.seed)
        keys = [f"{pid}\x1f{temp}\x1f{top_p}\x1f{top_k}" for pid in ids]
        common = dict(keys=keys, max_prompt_tokens=cfg.max_prompt_tokens, too_long=cfg.too_long,
                      use_chat_template=cfg.chat_template == "auto", stats=stats)
        if backend == "vllm":
            results = gen.generate_vllm(model, tok, prompts, params, context=None, **common)
            if on_batch:
                on_batch(len(prompts))
        else:
            last = [0]

            def progress(done: int, _tokens: int, last: list[int] = last) -> None:
                if on_batch:
                    on_batch(done - last[0])
                last[0] = done

            results = gen.generate_responses(model, tok, prompts, params, device=device, token_budget=cfg.token_budget,
                                             max_batch_size=cfg.max_batch_size, on_batch=progress,
                                             before_generate=before_generate, **common)
            skipped = len(prompts) - last[0]
            if on_batch and skipped:
                on_batch(skipped)
        for row, pid, res in zip(orig_rows, ids, results, strict=True):
            items = res.generations if res.skipped is None else [None]
            for j, item in enumerate(items):
                cols["_row"].append(row)
                cols["_sampler"].append(shard.sampler)
                cols["_grid"].append(g)
                cols["_ret"].append(j)
                cols["prompt_id"].append(pid)
                cols["response"].append(item.text if item else None)
                cols["model_version"].append(spec.version)
                cols["sampler"].append(name)
                cols["temperature"].append(temp)
                cols["top_p"].append(top_p)
                cols["top_k"].append(top_k)
                cols["seed"].append(sc.seed)
                cols["n_prompt_tokens"].append(res.n_prompt_tokens)
                cols["n_tokens"].append(item.n_tokens if item else None)
                cols["finish_reason"].append(item.finish_reason if item else None)
                cols["skip_reason"].append(res.skipped)
                cols["truncated"].append(res.truncated)
    return pa.table(cols, schema=SHARD), stats


def run_shard_spec(spec: ShardSpec, on_batch: Callable[[int], None] | None = None,
                   before_generate: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The worker entry point: reuse the committed shard or generate and commit it.
    Returns a small dict (the dataset ref, counters, where it ran), never the rows."""
    store = shards.open_store(spec)
    if spec.reuse and store.exists(spec.name):
        return shards.reused_shard(store, spec.name)
    cfg = SampleConfig.model_validate(spec.config)
    if spec.device == "cpu" and cfg.cpu_threads:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    prompts = shards.shard_prompts(store, spec)
    shard = Shard(spec.label, spec.name, spec.sampler, np.arange(prompts.num_rows))
    table, stats = run_shard(shard, prompts, cfg, shards.resolved_model(spec, store), spec.device,
                             on_batch=on_batch, before_generate=before_generate)
    extra = {"generated_tokens": stats.generated_tokens, "seconds": round(stats.seconds, 4),
             "oom_splits": stats.oom_splits, "label": spec.label, **shards.worker_identity()}
    return shards.commit_shard(store, spec.name, table, reuse=spec.reuse, extra=extra, schema=SHARD,
                               parents=[spec.prompts_ref], stage="sample", flow_run_id=spec.flow_run_id)


def inline_runner(before_generate: Callable[[int], None] | None = None) -> ShardRunner:
    """One shard after the other in this process (the model stays loaded between shards)."""

    def run(specs: Sequence[ShardSpec], on_batch: Callable[[int], None]) -> Iterator[tuple[ShardSpec, dict]]:
        for spec in specs:
            yield spec, run_shard_spec(spec, on_batch=on_batch, before_generate=before_generate)

    return run


# --- merging -----------------------------------------------------------------------------------

_WS = r"[\s\p{Z}\x{0B}\x{85}]+"


def normalise_ws(arr: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Collapse runs of whitespace (Unicode separators such as U+3000 too) and trim."""
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(arr, _WS, " "))


def dedup_responses(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first of identical (whitespace-normalised) responses per prompt, with the
    group size in `dup_count`. The input order decides which one is first."""
    n = table.num_rows
    norm = normalise_ws(table.column("response"))
    keyed = pa.table({"p": table.column("prompt_id"), "r": norm, "i": pa.array(np.arange(n, dtype=np.int64))})
    groups = keyed.group_by(["p", "r"], use_threads=False).aggregate([("i", "min"), ("i", "count")])
    order = np.argsort(np.asarray(groups.column("i_min")), kind="stable")
    keep = pc.take(groups.column("i_min"), pa.array(order))
    counts = pc.take(groups.column("i_count"), pa.array(order))
    out = table.take(keep).append_column("dup_count", pc.cast(counts, pa.int32()))
    return out, n - out.num_rows


def served_candidates(served: pa.Table) -> pa.Table:
    """Served responses as candidates; candidate_id = response_id so feedback joins on it."""
    n = served.num_rows
    return pa.table({
        "candidate_id": served.column("response_id"), "prompt_id": served.column("prompt_id"),
        "prompt": served.column("prompt"), "response": served.column("response"),
        "origin": pa.array(["served"] * n, pa.string()), "model_version": served.column("model_version"),
        "finish_reason": pa.array(["served"] * n, pa.string()), "dup_count": pa.array(np.ones(n, dtype=np.int32)),
        "served_at": served.column("served_at"), "position": served.column("position"),
        "variant": served.column("variant"),
    })


def assemble(shards: list[pa.Table], good: pa.Table, dedup: bool) -> tuple[pa.Table, pa.Table, dict]:
    """Shard outputs -> (sampled candidates, skipped rows, counts), in a stable order."""
    allrows = pa.concat_tables([t.cast(SHARD) for t in shards]) if shards else SHARD.empty_table()
    allrows = allrows.sort_by([("_row", "ascending"), ("_sampler", "ascending"), ("_grid", "ascending"),
                               ("_ret", "ascending")])
    skipped_mask = pc.is_valid(allrows.column("skip_reason"))
    # a prompt's length does not depend on the grid point: report each skip once per sampler
    skipped = allrows.filter(pc.and_(skipped_mask, pc.equal(allrows.column("_grid"), 0)))
    made = allrows.filter(pc.invert(skipped_mask))
    row_pos = pc.index_in(made.column("_row"), good.column("_row"))
    made = made.append_column("prompt", pc.take(good.column("prompt"), row_pos))
    counts = {"truncated": int(pc.sum(pc.cast(made.filter(pc.equal(made.column("_ret"), 0)).column("truncated"),
                                              pa.int64())).as_py() or 0)}
    dropped = 0
    if dedup and made.num_rows:
        made, dropped = dedup_responses(made)
    else:
        made = made.append_column("dup_count", pa.array(np.ones(made.num_rows, dtype=np.int32)))
    counts["duplicate_response"] = dropped
    cid = stable_id(made.column("prompt_id"), made.column("model_version"), made.column("sampler"),
                    made.column("seed"), made.column("temperature"), made.column("top_p"), made.column("top_k"),
                    normalise_ws(made.column("response")))
    out = pa.table({
        "candidate_id": cid, "prompt_id": made.column("prompt_id"), "prompt": made.column("prompt"),
        "response": made.column("response"), "origin": pa.array(["sampled"] * made.num_rows, pa.string()),
        **{c: made.column(c) for c in ("model_version", "sampler", "temperature", "top_p", "top_k", "seed",
                                       "n_prompt_tokens", "n_tokens", "finish_reason", "dup_count")},
    })
    return out, skipped, counts


# --- the stage ---------------------------------------------------------------------------------

def model_keys(cfg: SampleConfig, registry: Any) -> dict[str, str]:
    """What the stage's skip key must know about the models beyond the config: the version a
    registry tag points at now (it moves on promotion) and local folders' fingerprints."""
    out = {}
    for i, sc in enumerate(cfg.samplers):
        spec = resolve_model(sc.model, registry)
        out[sampler_name(cfg, i)] = f"{spec.version}|{spec.fingerprint}"
    return out


def make_sample_stage(shard_runner: ShardRunner | None = None, reuse_shards: bool = True,
                      progress: Callable[[], Callable[[float], None] | None] | None = None,
                      device: str | None = None) -> Callable[[StageContext], StageResult]:
    """The stage function for the runner; `progress()`, called when sampling starts, may give
    a callback for the share of prompts done. `device` is the workers' device when shards run
    elsewhere (a Ray cluster's GPUs), instead of the one resolved in this process."""

    def sample(ctx: StageContext) -> StageResult:
        return sample_stage(ctx, shard_runner=shard_runner, reuse_shards=reuse_shards,
                            on_progress=progress() if progress else None, device=device)

    return sample


def shard_specs(ctx: StageContext, shards: list[Shard], good: pa.Table, cfg: SampleConfig,
                models: list[ModelSpec], device: str, reuse: bool) -> list[ShardSpec]:
    """The planned shards as specs a worker anywhere can run (ids, not rows, travel)."""
    ids = good.column("prompt_id")
    rows = good.column("_row")
    config = cfg.model_dump(mode="json")
    cache = getattr(ctx.registry, "cache_dir", None)
    return [ShardSpec(
        label=s.label, name=s.name, store_root=ctx.store.root, store_options=travelling_options(ctx.store.options),
        prompts_ref=ctx.inputs["prompts"], prompt_ids=tuple(pc.take(ids, pa.array(s.rows)).to_pylist()),
        rows=tuple(pc.take(rows, pa.array(s.rows)).to_pylist()), sampler=s.sampler, config=config,
        model=models[s.sampler], device=device, model_cache=str(cache) if cache else None,
        flow_run_id=ctx.flow_run_id, reuse=reuse) for s in shards]


def sample_stage(ctx: StageContext, *, shard_runner: ShardRunner | None = None, reuse_shards: bool = True,
                 on_progress: Callable[[float], None] | None = None,
                 on_shard: Callable[[str, dict], None] | None = None,
                 before_generate: Callable[[int], None] | None = None, device: str | None = None) -> StageResult:
    """prompts (+ served) -> candidates. `shard_runner(specs, on_batch)` runs the shards and
    yields each one's info as it finishes (default: one after the other in this process; the
    flow runs them as Prefect tasks, here or on Ray); `on_progress(fraction)` reports
    progress; `on_shard(label, info)` is told when a shard is done (its output is then
    durable); `reuse_shards=False` (a forced run) recomputes shards that were already finished."""

    cfg: SampleConfig = ctx.config
    store = ctx.store
    runner = shard_runner or inline_runner(before_generate)
    models = [resolve_model(sc.model, ctx.registry) for sc in cfg.samplers]  # fail before work
    device = device or gen.pick_device(cfg.device)
    if device == "cpu" and cfg.cpu_threads:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    prompts_ref = ctx.inputs["prompts"]
    names = store.dataset(prompts_ref).schema.names
    prompts = ctx.read("prompts", columns=[c for c in ("prompt_id", "prompt", "messages") if c in names])
    good, quarantine, q_counts = check_prompts(prompts, source=prompts_ref)
    shards = plan_shards(prompts_ref, good, cfg, models, device)
    specs = shard_specs(ctx, shards, good, cfg, models, device, reuse_shards)
    grid_sizes = [len(sc.grid()) for sc in cfg.samplers]
    total = sum(s.n_prompts * grid_sizes[s.sampler] for s in specs) or 1
    done = [0]
    finished = 0  # prompt x grid points of the shards already gathered
    show = cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sample", unit="prompt", disable=not show)

    def advance(k: int) -> None:
        done[0] += k
        bar.update(k)

    by_name: dict[str, dict] = {}
    t0 = time.perf_counter()
    try:
        for spec, info in runner(specs, advance):
            finished += spec.n_prompts * grid_sizes[spec.sampler]
            advance(max(0, finished - done[0]))  # reused, skipped or remote: no batch progress came
            if not info.get("reused"):
                ctx.logger.info("sample shard %s: %d tokens, %.1f tokens/s", spec.label,
                                info.get("generated_tokens", 0),
                                info.get("generated_tokens", 0) / max(float(info.get("seconds", 0.0)), 1e-9))
            by_name[spec.name] = info
            if on_shard:
                on_shard(spec.label, info)
            if on_progress:
                on_progress(done[0] / total)
    finally:
        bar.close()
        release_models()  # the next stage (training) may need the GPU memory
    missing = [s.label for s in specs if s.name not in by_name]
    if missing:
        raise RuntimeError(f"sample: {len(missing)} shards did not finish: {', '.join(missing[:5])}")
    infos = [by_name[s.name] for s in specs]
    wall = time.perf_counter() - t0
    sampled, skipped, counts = assemble([store.read(i["ref"]) for i in infos], good, cfg.dedup)
    if skipped.num_rows:
        skipped = skipped.append_column("prompt", pc.take(good.column("prompt"),
                                                          pc.index_in(skipped.column("_row"), good.column("_row"))))
        reasons = [f"{r} ({s})" for r, s in zip(skipped.column("skip_reason").to_pylist(),
                                                skipped.column("sampler").to_pylist(), strict=True)]
        rows = skipped.select(["_row", "prompt_id", "prompt", "sampler", "n_prompt_tokens"])
        quarantine = pa.concat_tables([quarantine, _quarantine(rows, reasons, prompts_ref)])
        for r in skipped.column("skip_reason").to_pylist():
            q_counts[r] = q_counts.get(r, 0) + 1
    parts = [sampled]
    n_served = 0
    if ctx.has("served"):
        served = ctx.read("served")
        n_served = served.num_rows
        parts.append(served_candidates(served))
    from dpoflow.storage.schemas import conform

    candidates = pa.concat_tables([conform("candidates", p, CANDIDATES) for p in parts])
    new = [i for i in infos if not i.get("reused")]
    tokens = sum(int(i.get("generated_tokens", 0)) for i in new)
    gen_s = sum(float(i.get("seconds", 0.0)) for i in new)
    tps = tokens / gen_s if gen_s else 0.0
    ctx.logger.info("sample: %d candidates (%d sampled, %d served) from %d prompts; %d tokens in %.1fs "
                    "generating = %.1f tokens/s; %d/%d shards reused", candidates.num_rows, sampled.num_rows,
                    n_served, good.num_rows, tokens, gen_s, tps, len(infos) - len(new), len(infos))
    report = {
        "prompts_in": prompts.num_rows,
        "prompts_sampled": int(pc.count_distinct(sampled.column("prompt_id")).as_py()) if sampled.num_rows else 0,
        "candidates": candidates.num_rows, "sampled": sampled.num_rows, "served": n_served,
        "dropped": {k: v for k, v in {"duplicate_response": counts["duplicate_response"]}.items() if v},
        "quarantined": q_counts, "truncated": counts["truncated"],
        "shards": len(infos), "shards_reused": len(infos) - len(new),
        "generated_tokens": tokens, "generation_seconds": round(gen_s, 3), "tokens_per_s": round(tps, 1),
        "wall_seconds": round(wall, 3), "device": device, "models": {m.ref: m.version for m in models},
    }
    return StageResult(outputs={"candidates": candidates}, quarantine=quarantine if quarantine.num_rows else None,
                       report=report, metadata={"candidates": {"shards": [i["ref"] for i in infos],
                                                               "models": report["models"], "device": device}})
