"""Config of the `ingest` stage: event sources, abuse filters, signal parameters, and the
contract constants the other feedback modules share (required fields, known formats)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field

from dpoflow.tasks.contract import Section

STAGE = "ingest"
STRING_FIELDS = ["event_id", "user_id", "response_id", "event_type", "session_id", "surface", "variant"]
REQUIRED = ["event_id", "user_id", "response_id", "event_type", "ts"]
FILE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
                ".json": "jsonl", ".csv": "csv"}
DEFAULT_WEIGHTS = {"like": 1.0, "dislike": -1.0, "favourite": 2.0, "copy": 0.5, "share": 1.5,
                   "regenerate": -0.5, "report": -3.0, "dwell": 0.5}


class SourceConfig(Section):
    """One event source. Secrets never live here: SQL URLs are read from the env var `url_env`
    (or, through the flow layer, from the Prefect Secret block `url_secret`)."""

    name: str = Field(..., description="source name: the watermark key and the quarantine `source` label")
    kind: Literal["files", "sql"] = Field("files", description="files (Parquet / JSONL / CSV) or sql")
    path: str | None = Field(None, description="files: a file, a folder, or a glob such as events/*.parquet")
    format: Literal["auto", "parquet", "jsonl", "csv"] = Field("auto", description="files: format (auto = by suffix)")
    url_env: str | None = Field(None, description="sql: NAME of the env var holding the SQLAlchemy URL")
    url_secret: str | None = Field(None, description="sql: NAME of a Prefect Secret block holding the URL "
                                   "(instead of url_env; needs a Prefect server)")
    query: str | None = Field(None, description="sql: a SELECT returning event columns (or use `table`)")
    table: str | None = Field(None, description="sql: a table to read instead of a query")
    watermark_column: str = Field("ts", description="sql: monotone column for incremental reads")
    lookback_s: float = Field(0.0, description="sql: re-read this many seconds before the watermark (late rows); "
                              "event_id dedup makes the overlap harmless")
    chunk_rows: int = Field(50_000, gt=0, description="sql: rows fetched per chunk")
    columns: dict[str, str] = Field(default_factory=dict, description="rename source columns: {source_name: contract_name}")


class AbuseConfig(Section):
    rate_cap_per_day: int = Field(1000, ge=0, description="max events per user per UTC day; over it the user-day is quarantined (0 = off)")
    uniform_min_responses: int = Field(20, ge=0, description="users voting on at least this many responses, always with "
                                       "the same event type, are quarantined (0 = off)")
    uniform_types: list[str] = Field(default_factory=lambda: ["like", "dislike", "favourite", "share", "report"],
                                     description="event types that count as votes for the uniform-voter check")
    burst_max_events: int = Field(60, ge=0, description="more events than this from one user in one burst window is a burst (0 = off)")
    burst_window_s: float = Field(60.0, gt=0, description="burst window length; windows start at multiples of it and at half offsets")


class IngestConfig(Section):
    """Feedback ingestion and aggregation (see the module docstring for the formulas)."""

    sources: list[SourceConfig] = Field(default_factory=list, description="event sources, read in order")
    batch_rows: int = Field(500_000, gt=0, description="rows per processing batch (memory vs speed)")
    state_memory_mb: int = Field(768, gt=0, description="memory for the per-event state (id hashes, codes, "
                                 "times; about 60 bytes an event) before partitions spill to scratch files")
    partition_rows: int = Field(1_000_000, gt=0, description="target events per partition of that state: "
                                "exactly-once, abuse filters and votes work one partition at a time")
    event_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS),
                                            description="event type -> weight; unknown types are quarantined")
    exclusive_groups: list[list[str]] = Field(default_factory=lambda: [["like", "dislike"]],
                                              description="event types that are one vote (latest wins across them)")
    value_required: list[str] = Field(default_factory=lambda: ["dwell"], description="event types that need `value`")
    dwell_full_ms: float = Field(30_000.0, gt=0, description="dwell time that earns the full dwell weight")
    half_life_days: float = Field(30.0, gt=0, description="time-decay half-life of a vote")
    as_of: dt.datetime | None = Field(None, description="reference time for decay (default: newest valid event); "
                                      "never later than the ingest time")
    max_clock_skew: float = Field(300.0, ge=0, description="seconds: events later than the ingest time plus this are "
                                  "quarantined as `future ts` (a client with a wrong clock)")
    min_ts: dt.datetime | None = Field(None, description="events before this are quarantined as `stale ts` "
                                       "(default: `max_event_age_days` before as_of, or before the ingest time)")
    max_event_age_days: float = Field(365.0, gt=0, description="the default `min_ts`: this many days before as_of "
                                      "(or the ingest time when as_of is not set)")
    candidate_lookback_versions: int = Field(7, ge=0, description="events may answer the candidates of this many "
                                             "earlier `candidates` versions too (feedback on last nights' responses); "
                                             "older ones are orphans")
    propensities: dict[int, float] = Field(default_factory=dict, description="position -> examination propensity "
                                           "(positions past the table use its last entry)")
    estimate_propensities: bool = Field(False, description="estimate propensities from randomised traffic")
    randomised_variant: str = Field("random", description="`variant` value that marks randomised-position traffic")
    min_randomised_events: int = Field(100, ge=1, description="randomised events per position needed to estimate it")
    min_propensity: float = Field(0.05, gt=0, le=1, description="propensity floor (bounds IPW weights at 1/p_min)")
    prior_strength: float = Field(2.0, ge=0, description="m: pseudo-votes in the Bayesian average")
    prior_mean: float = Field(0.0, ge=-1, le=1, description="mu0: prior mean of a vote in [-1, 1]")
    wilson_z: float = Field(1.96, gt=0, description="z of the Wilson interval (1.96 = 95%)")
    abuse: AbuseConfig = Field(default_factory=AbuseConfig, description="bot and abuse filters")
