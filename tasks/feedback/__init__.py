"""The `ingest` stage: user-behaviour events -> validated `feedback_events` + per-response `signals`.

Why it looks like this: events arrive every day, partly overlapping what came before, with junk
rows, bots and position bias. The stage therefore

1. reads each configured source incrementally (files: only new or changed files; SQL: rows at or
   after the stored watermark, minus a look-back window for late rows), in batches;
2. validates every row and sends bad ones to `quarantine` with a reason (never a silent drop);
3. de-duplicates by ``event_id`` against everything accepted before (exactly-once);
4. filters abuse (rate caps, uniform voters, bursts) over all events so far;
5. aggregates one vote per user per (response, vote group), latest wins, into signals.

Storage mode: each run writes a *full* new version of `feedback_events` (all valid events so
far, prior version + new, deduplicated), so a version is self-contained and abuse found later
can move older events to quarantine. The hot path works on compact numeric arrays (64-bit
hashes of ids, integer codes), streamed batch by batch; raw rows are spooled to an uncompressed
Arrow IPC file in scratch space, never held in memory whole.

Performance shape (benchmarks/README.md, "Feedback ingestion"): pass 1 validates and encodes
batches in two worker threads (Arrow and numpy release the GIL); the main thread spools every
row and files the compact state of the valid ones into hash partitions: event-id hashes by
event id, the rest (user hash, response code, type, ts, value, position) by user, so each
partition holds every row of its keys. The partitions stay in memory up to
`ingest.state_memory_mb` and spill to scratch files past it (tasks/partitions.py), so memory
does not grow with the number of events. Then, two partitions at a time: exactly-once (one
sort per event-id partition, the first occurrence wins) and the abuse filters (per user
partition). Pass 2 encodes the accepted rows into the version's Parquet files from two threads
(`DatasetStore.stage_files`) while a third counts the votes and signals per user partition.

The parts, one idea a module: `config` (IngestConfig and its sources), `sources` (reading
files and SQL incrementally, watermarks), `validation` (typing and checking rows, quarantine
rows), `accumulate` (the partitioned state, exactly-once, abuse filters), `signals` (votes
and the signal formulas) and `stage` (the stage function that runs them in two passes).
"""

from dpoflow.tasks.feedback.accumulate import (
    ABUSE_REASONS,
    BURST,
    DUP,
    DUP_QUARANTINED,
    INVALID,
    OK,
    RATE_CAP,
    UNIFORM,
    EventAccumulator,
    Outcome,
)
from dpoflow.tasks.feedback.config import AbuseConfig, IngestConfig, SourceConfig
from dpoflow.tasks.feedback.signals import signal_formulas_markdown, wilson_interval
from dpoflow.tasks.feedback.sources import (
    STATE_KEY,
    SourceError,
    expected_rows,
    iter_files,
    known_candidates,
    source_fingerprint,
)
from dpoflow.tasks.feedback.stage import ingest
from dpoflow.tasks.feedback.validation import parse_ts, quarantine_rows, validate
from dpoflow.tasks.kernels import Codes, hash64

__all__ = [
    "ABUSE_REASONS", "BURST", "DUP", "DUP_QUARANTINED", "INVALID", "OK", "RATE_CAP", "UNIFORM", "AbuseConfig",
    "Codes", "EventAccumulator", "IngestConfig", "Outcome", "STATE_KEY", "SourceConfig", "SourceError",
    "expected_rows", "hash64", "ingest", "iter_files", "known_candidates", "parse_ts", "quarantine_rows", "signal_formulas_markdown",
    "source_fingerprint", "validate", "wilson_interval",
]
