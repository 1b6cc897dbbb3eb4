"""The data contract: the Arrow schema of every dataset the pipeline reads or writes.

Every write goes through :func:`validate`, so a stage that produces a wrong column fails
at the boundary with an error naming the dataset, the column and the problem, instead of
corrupting the next stage. Extra columns are an error too: a contract that silently grows
is no contract. Columns marked nullable may be null; all others must be filled.

Sections are owned by the stage that writes the dataset; keep each block self-contained.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

TS = pa.timestamp("us", tz="UTC")
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


# --- inputs -------------------------------------------------------------------------------

PROMPTS = pa.schema([
    _f("prompt_id", pa.string()),
    _f("prompt", pa.string()),  # plain text, or the last user turn of `messages`
    _f("messages", MESSAGES, True),  # chat prompts: the conversation so far
    _f("reference", pa.string(), True),  # one reference answer (BLEU / ROUGE)
    _f("references", pa.list_(pa.string()), True),  # several references, when given
    _f("category", pa.string(), True),
    _f("language", pa.string(), True),
])

# Responses users actually saw (from serving logs); they enter `candidates` with origin=served.
SERVED = pa.schema([
    _f("response_id", pa.string()),
    _f("prompt_id", pa.string()),
    _f("prompt", pa.string()),
    _f("response", pa.string()),
    _f("model_version", pa.string()),
    _f("served_at", TS),
    _f("position", pa.int32(), True),
    _f("variant", pa.string(), True),
])

# --- sampling -----------------------------------------------------------------------------

CANDIDATES = pa.schema([
    _f("candidate_id", pa.string()),
    _f("prompt_id", pa.string()),
    _f("prompt", pa.string()),
    _f("response", pa.string()),
    _f("origin", pa.string()),  # sampled | served
    _f("model_version", pa.string()),
    _f("sampler", pa.string(), True),
    _f("temperature", pa.float32(), True),
    _f("top_p", pa.float32(), True),
    _f("top_k", pa.int32(), True),
    _f("seed", pa.int64(), True),
    _f("n_prompt_tokens", pa.int32(), True),
    _f("n_tokens", pa.int32(), True),
    _f("finish_reason", pa.string(), True),  # eos | length | served
    _f("dup_count", pa.int32()),
    _f("served_at", TS, True),
    _f("position", pa.int32(), True),
    _f("variant", pa.string(), True),
])

# --- scoring ------------------------------------------------------------------------------

SCORES = pa.schema([
    _f("candidate_id", pa.string()),
    _f("prompt_id", pa.string()),
    _f("bleu", pa.float64(), True),
    _f("rouge1", pa.float64(), True),
    _f("rouge2", pa.float64(), True),
    _f("rougeL", pa.float64(), True),
    _f("reward", pa.float64(), True),
    _f("flag_safety", pa.bool_()),
    _f("flag_pii", pa.bool_()),
    _f("flag_repetition", pa.bool_()),
    _f("flag_length", pa.bool_()),
    _f("flag_refusal", pa.bool_()),
    _f("flag_language", pa.bool_()),
    _f("flag_empty", pa.bool_()),
    _f("flag_encoding", pa.bool_(), True),  # broken byte sequences (U+FFFD); null in versions before the rule
    _f("flag_reasons", pa.list_(pa.string())),
    _f("extra_metrics", pa.map_(pa.string(), pa.float64()), True),
    _f("auto_score", pa.float64(), True),
])

# --- feedback -----------------------------------------------------------------------------

FEEDBACK_EVENTS = pa.schema([
    _f("event_id", pa.string()),
    _f("user_id", pa.string()),
    _f("response_id", pa.string()),
    _f("event_type", pa.string()),
    _f("value", pa.float64(), True),
    _f("ts", TS),
    _f("session_id", pa.string(), True),
    _f("surface", pa.string(), True),
    _f("position", pa.int32(), True),
    _f("variant", pa.string(), True),
    _f("source", pa.string(), True),
])

QUARANTINE = pa.schema([
    _f("source", pa.string()),  # file path, SQL source name, or dataset being imported
    _f("stage", pa.string()),
    _f("dataset", pa.string()),  # the dataset the row was meant for
    _f("reason", pa.string()),
    _f("raw", pa.string()),  # the rejected row as JSON
    _f("row_index", pa.int64(), True),
    _f("quarantined_at", TS),
])
# What makes two quarantine rows the same row (when it was quarantined does not): appends are
# deduplicated on it, so a rerun of a killed import or stage adds its bad rows once.
QUARANTINE_KEY = ["source", "stage", "dataset", "reason", "raw", "row_index"]

SIGNALS = pa.schema([
    _f("candidate_id", pa.string()),
    _f("behaviour_score", pa.float64()),
    _f("confidence", pa.float64()),
    _f("positive_share", pa.float64(), True),
    _f("wilson_lower", pa.float64(), True),  # lower bound of the positive share (see ingest formulas)
    _f("n_users", pa.int64()),
    _f("n_events", pa.int64()),
    _f("last_ts", TS, True),
])

# Raw human annotations as imported (one row per annotator label).
ANNOTATIONS = pa.schema([
    _f("annotation_id", pa.string()),
    _f("kind", pa.string()),  # pairwise | ranking | rating
    _f("prompt_id", pa.string(), True),
    _f("annotator", pa.string()),
    _f("item_ids", pa.list_(pa.string())),  # pairwise: [a, b]; ranking: best first; rating: [id]
    _f("winner", pa.string(), True),  # pairwise: a candidate id or "tie"
    _f("rating", pa.float64(), True),
    _f("ts", TS, True),
])

# Aggregated human labels (consensus over annotators).
JUDGEMENTS = pa.schema([
    _f("judgement_id", pa.string()),
    _f("kind", pa.string()),  # pairwise | ranking | rating
    _f("prompt_id", pa.string(), True),
    _f("item_ids", pa.list_(pa.string())),
    _f("winner", pa.string(), True),
    _f("ranks", pa.list_(pa.int32()), True),
    _f("rating", pa.float64(), True),
    _f("strength", pa.float64(), True),  # e.g. Bradley-Terry score or vote share
    _f("n_annotators", pa.int32()),
    _f("agreement", pa.float64(), True),
    _f("annotators", pa.list_(pa.string())),
])

# --- pairs and balanced splits ------------------------------------------------------------

PAIRS = pa.schema([
    _f("pair_id", pa.string()),
    _f("prompt_id", pa.string()),
    _f("prompt", pa.string()),
    _f("prompt_messages", MESSAGES, True),
    _f("chosen", pa.string()),
    _f("rejected", pa.string()),
    _f("chosen_id", pa.string()),
    _f("rejected_id", pa.string()),
    _f("chosen_score", pa.float64(), True),
    _f("rejected_score", pa.float64(), True),
    _f("margin", pa.float64(), True),
    _f("source", pa.string()),  # human | behaviour | reward | metrics | imported
    _f("strategy", pa.string()),
    _f("category", pa.string(), True),
    _f("language", pa.string(), True),
])

DPO_SPLIT = pa.schema(list(PAIRS) + [
    _f("group_id", pa.string(), True),  # prompt group used for the split (prompt or near-dup cluster)
])

# --- training -----------------------------------------------------------------------------

REF_LOGPS = pa.schema([
    _f("pair_id", pa.string()),
    _f("ref_chosen_logp", pa.float64()),
    _f("ref_rejected_logp", pa.float64()),
    _f("chosen_tokens", pa.int32()),
    _f("rejected_tokens", pa.int32()),
    _f("ref_model_version", pa.string()),
])

# One row per training run / evaluation / promotion decision (tasks.training.stage).
TRAIN_RUNS = pa.schema([
    _f("run_id", pa.string()),
    _f("model_version", pa.string()),  # the registered checkpoint (tagged `candidate`)
    _f("parent_model", pa.string(), True),  # models@<version> or path:<folder> the policy started from
    _f("ref_model", pa.string(), True),
    _f("train_data", pa.string()),
    _f("ref_logps", pa.string(), True),
    _f("steps", pa.int64()),
    _f("summary", pa.string()),  # JSON: trainer summary + tokenize stats
    _f("curves", pa.string(), True),  # PNG path in the workspace artifacts
    _f("created_at", TS),
])

MODEL_EVALS = pa.schema([
    _f("model_version", pa.string()),
    _f("baseline_model", pa.string(), True),  # production model of the generation comparison
    _f("eval_data", pa.string(), True),
    _f("n_pairs", pa.int64()),
    _f("reward_accuracy", pa.float64(), True),
    _f("reward_margin", pa.float64(), True),
    _f("eval_loss", pa.float64(), True),
    _f("win_rate", pa.float64(), True),
    _f("metrics", pa.string()),  # JSON: all metrics + generation comparison
    _f("report", pa.string(), True),  # markdown report path
    _f("created_at", TS),
])

PROMOTIONS = pa.schema([
    _f("model_version", pa.string()),
    _f("passed", pa.bool_()),
    _f("promoted", pa.bool_()),
    _f("previous_production", pa.string(), True),
    _f("production", pa.string(), True),
    _f("reasons", pa.list_(pa.string())),
    _f("thresholds", pa.string()),  # JSON of the promote config
    _f("created_at", TS),
])

MODELS = pa.schema([
    _f("model_version", pa.string()),
    _f("path", pa.string()),
    _f("parents", pa.list_(pa.string())),  # dataset refs and parent model versions
    _f("metrics", pa.string(), True),  # JSON
    _f("config", pa.string(), True),  # JSON
    _f("created_at", TS),
    _f("note", pa.string(), True),
])

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "served": SERVED,
    "candidates": CANDIDATES,
    "scores": SCORES,
    "feedback_events": FEEDBACK_EVENTS,
    "quarantine": QUARANTINE,
    "signals": SIGNALS,
    "annotations": ANNOTATIONS,
    "judgements": JUDGEMENTS,
    "pairs": PAIRS,
    "dpo_train": DPO_SPLIT,
    "dpo_eval": DPO_SPLIT,
    "ref_logps": REF_LOGPS,
    "train_runs": TRAIN_RUNS,
    "model_evals": MODEL_EVALS,
    "promotions": PROMOTIONS,
    "models": MODELS,
}

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class SchemaError(ValueError):
    """A table does not match its dataset's contract."""

    def __init__(self, dataset: str, column: str | None, problem: str):
        self.dataset, self.column, self.problem = dataset, column, problem
        where = f"column {column!r}" if column else "table"
        super().__init__(f"dataset {dataset!r}, {where}: {problem}")


class DatasetNameError(ValueError):
    """A dataset name is not a plain identifier (path traversal, absolute path, ...)."""


def validate_name(name: str) -> str:
    """Dataset names are lowercase identifiers; anything path-like is refused."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DatasetNameError(
            f"invalid dataset name {name!r}: use lowercase letters, digits and '_', "
            "starting with a letter (no '/', '..', or absolute paths)"
        )
    return name


def schema_for(name: str) -> pa.Schema | None:
    """The contract of a dataset; datasets without a contract (e.g. `shard_*`) return None."""
    validate_name(name)
    return SCHEMAS.get(name)


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    if src == dst or pa.types.is_null(src):
        return True
    if pa.types.is_integer(dst) and pa.types.is_integer(src):
        return True
    if pa.types.is_floating(dst) and (pa.types.is_floating(src) or pa.types.is_integer(src)):
        return True
    if pa.types.is_string(dst) and (pa.types.is_large_string(src) or pa.types.is_string_view(src)):
        return True
    if pa.types.is_timestamp(dst) and pa.types.is_timestamp(src):
        return True
    if (pa.types.is_list(dst) or pa.types.is_large_list(dst)) and (
        pa.types.is_list(src) or pa.types.is_large_list(src) or pa.types.is_list_view(src)
    ):
        return _castable(src.value_type, dst.value_type)
    if pa.types.is_struct(dst) and pa.types.is_struct(src):
        names = {src.field(i).name: src.field(i).type for i in range(src.num_fields)}
        return all(
            dst.field(i).name in names and _castable(names[dst.field(i).name], dst.field(i).type)
            for i in range(dst.num_fields)
        )
    if pa.types.is_map(dst) and pa.types.is_map(src):
        return _castable(src.key_type, dst.key_type) and _castable(src.item_type, dst.item_type)
    return False


def conform(name: str, table: pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    """Check `table` against the contract of `name` and return it cast to the exact schema.

    Missing nullable columns are added as nulls (so optional fields stay optional for the
    writer); missing required columns, unknown columns, incompatible types and nulls in
    required columns raise :class:`SchemaError`. Casts are zero-copy where Arrow allows.
    """
    schema = schema if schema is not None else schema_for(name)
    if schema is None:
        return table
    extra = [c for c in table.column_names if schema.get_field_index(c) < 0]
    if extra:
        raise SchemaError(name, extra[0], f"unknown column (contract has {schema.names})")
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise SchemaError(name, field.name, "required column is missing")
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        col = table.column(field.name)
        if not _castable(col.type, field.type):
            raise SchemaError(name, field.name, f"type {col.type} cannot be stored as {field.type}")
        if col.type != field.type:
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(name, field.name, f"cannot cast {col.type} to {field.type}: {exc}") from exc
        if not field.nullable and col.null_count:
            raise SchemaError(name, field.name, f"{col.null_count} null value(s) in a required column")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def null_mask(table: pa.Table, required: list[str]) -> pa.Array:
    """Boolean mask of rows where any of `required` is null (used to route rows to quarantine)."""
    mask = pa.array([False] * table.num_rows)
    for c in required:
        if c in table.column_names:
            mask = pc.or_(mask, pc.is_null(table.column(c)))
        else:
            return pa.array([True] * table.num_rows)
    return mask
