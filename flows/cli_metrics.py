"""`dpoflow metrics compute`: score a Parquet / JSONL file with BLEU / ROUGE / other metrics.

    dpoflow metrics compute --metrics bleu,rouge --input preds.jsonl --output scores.parquet

Input columns: `prediction` (string) and `reference` (a string or a list of strings; a
`references` column is used when `reference` is absent). The output holds the input
columns plus one column per score (bleu 0-100, rouge1 / rouge2 / rougeL F1, and any other
`evaluate` metric named by Hub name or local path). Rows without a reference or
prediction get null scores. Invalid UTF-8 bytes are replaced by U+FFFD (counted);
texts longer than --max-chars are cut for scoring (counted). Also runnable as
``python -m flows.cli_metrics metrics compute ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

BUILTIN = ("bleu", "rouge")


def _read(path: Path) -> tuple[Any, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".parquet", ".pq"):
        return pq.read_table(path), 0
    rows, bad = [], 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                bad += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(obj)
    # a column mixing strings and lists of strings (reference) becomes lists throughout
    keys = {k for r in rows for k in r}
    for k in keys:
        vals = [r.get(k) for r in rows]
        if any(isinstance(v, list) for v in vals) and any(isinstance(v, str) for v in vals):
            for r in rows:
                if isinstance(r.get(k), str):
                    r[k] = [r[k]]
    try:
        return pa.Table.from_pylist(rows), bad
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(f"{path}: inconsistent column types ({exc})") from None


def _write(table, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".parquet", ".pq"):
        pq.write_table(table, path)
        return
    with open(path, "w", encoding="utf-8") as fh:
        for row in table.to_pylist():
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            fh.write(json.dumps(clean, ensure_ascii=False, default=str) + "\n")


def compute_file(input_path: str, output_path: str, metrics: list[str], *, prediction_column: str = "prediction",
                 reference_column: str | None = None, use_stemmer: bool = False, smooth_method: str = "exp",
                 lowercase: bool = False, workers: int | None = None, max_chars: int = 20_000) -> dict[str, Any]:
    """Score a file; returns a summary (rows, scored, means, counts of repaired / cut texts)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from dpoflow.tasks.metrics import fast
    from dpoflow.tasks.scoring import ExtraMetric, cap_chars, extra_metric_values, repair_utf8

    table, bad_lines = _read(Path(input_path))
    if reference_column is None:
        reference_column = "reference" if "reference" in table.column_names else "references"
    for col in (prediction_column, reference_column):
        if col not in table.column_names:
            raise ValueError(f"{input_path}: missing column {col!r} (columns: {table.column_names})")
    preds = table.column(prediction_column).combine_chunks()
    refs = table.column(reference_column).combine_chunks()
    if pa.types.is_null(preds.type):
        preds = pa.nulls(len(preds), pa.string())
    preds, bad_p = repair_utf8(preds.cast(pa.string()))
    if pa.types.is_null(refs.type):
        refs = pa.nulls(len(refs), pa.string())
    n_cut = 0
    if pa.types.is_list(refs.type) or pa.types.is_large_list(refs.type):
        flat, bad_r = repair_utf8(pc.list_flatten(refs).cast(pa.string()))
        flat, n_cut = cap_chars(flat, max_chars)
        refs = pa.ListArray.from_arrays(refs.offsets, flat,
                                        mask=pc.is_null(refs))
    else:
        refs, bad_r = repair_utf8(refs.cast(pa.string()))
        refs, n_cut = cap_chars(refs, max_chars)
    preds, n_cut_p = cap_chars(preds, max_chars)
    builtin = [m for m in metrics if m in BUILTIN]
    others = [m for m in metrics if m not in BUILTIN]
    scores = fast.compute(preds, refs, builtin, smooth_method=smooth_method, lowercase=lowercase,
                          use_stemmer=use_stemmer, workers=workers) if builtin else {}
    norm = fast.normalise(preds, refs)
    ok = norm.has_ref() & norm.pred_valid
    if others:
        idx = np.flatnonzero(ok)
        p_list = preds.take(pa.array(idx)).to_pylist()
        r_all = refs.take(pa.array(idx)).to_pylist()
        r_list = [[x for x in (r if isinstance(r, list) else [r]) if x and x.strip()] for r in r_all]
        for name in others:
            vals = np.full(len(preds), np.nan)
            label = Path(name).name if Path(name).exists() else name
            vals[idx] = extra_metric_values(label, ExtraMetric(path=name), p_list, r_list)
            scores[label] = vals
    out = table
    for key, vals in scores.items():
        if key in out.column_names:
            out = out.drop_columns([key])
        out = out.append_column(key, fast.to_arrow(vals))
    _write(out, Path(output_path))
    return {
        "rows": table.num_rows,
        "scored": int(ok.sum()),
        "no_reference_or_prediction": int((~ok).sum()),
        "invalid_utf8": int(bad_lines + bad_p + bad_r),
        "truncated": int(n_cut + n_cut_p),
        "means": {k: (float(np.nanmean(v)) if (~np.isnan(v)).any() else None) for k, v in scores.items()},
        "output": str(output_path),
    }


def _cmd_compute(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        summary = compute_file(args.input, args.output, metrics, prediction_column=args.prediction_column,
                               reference_column=args.reference_column, use_stemmer=args.use_stemmer,
                               smooth_method=args.smooth_method, lowercase=args.lowercase, workers=args.workers,
                               max_chars=args.max_chars)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(summary, ensure_ascii=False))
    else:
        print(f"scored {summary['scored']} of {summary['rows']} rows -> {summary['output']}")
        for k, v in summary["means"].items():
            print(f"  {k:>8}: mean {v:.4f}" if v is not None else f"  {k:>8}: no scored rows")
        for k in ("no_reference_or_prediction", "invalid_utf8", "truncated"):
            if summary[k]:
                print(f"  {k}: {summary[k]}")
    return 0


def register(sub) -> None:
    """Add `metrics compute` to the dpoflow CLI."""
    p = sub.add_parser("metrics", help="score files with BLEU / ROUGE / evaluate metrics")
    msub = p.add_subparsers(dest="metrics_command", required=True)
    c = msub.add_parser("compute", help="score a Parquet / JSONL file of predictions and references")
    c.add_argument("--metrics", default="bleu,rouge", help="comma list: bleu, rouge, or evaluate metric names / local paths")
    c.add_argument("--input", required=True, help="Parquet or JSONL file with prediction / reference columns")
    c.add_argument("--output", required=True, help="output file (.parquet or .jsonl)")
    c.add_argument("--prediction-column", default="prediction")
    c.add_argument("--reference-column", default=None, help="default: reference, else references")
    c.add_argument("--use-stemmer", action="store_true", help="ROUGE: Porter stemming")
    c.add_argument("--smooth-method", default="exp", choices=["exp", "floor", "add-k", "none"])
    c.add_argument("--lowercase", action="store_true", help="BLEU: lowercase")
    c.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    c.add_argument("--max-chars", type=int, default=20_000, help="cut longer texts to this many characters")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(func=_cmd_compute)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpoflow")
    parser.add_argument("--workspace", default=None)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
