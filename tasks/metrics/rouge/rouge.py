"""ROUGE-1 / ROUGE-2 / ROUGE-L F1 for `evaluate`, CJK-aware, offline (dpoflow's own module).

Same numbers as ``rouge_score.RougeScorer`` F1 (stemming optional; several references:
best F1 per type, as ``score_multi``). Text with CJK characters is tokenized with one
character per token, other scripts as words (rule in ``dpoflow.tasks.metrics.tokenize``), where
rouge_score's default tokenizer would drop all non-ASCII text.

Load without the Hub: ``evaluate.load("<dpoflow>/tasks/metrics/rouge")``.
"""

import datasets
import evaluate
import numpy as np

from dpoflow.tasks.metrics.fast import ROUGE_KEYS, compute

_CITATION = """Lin (2004) ROUGE: A Package for Automatic Evaluation of Summaries."""

_DESCRIPTION = """ROUGE-1/2/L F1 per prediction (rouge_score numbers, CJK characters as tokens)."""

_KWARGS = """
Args:
    predictions: list of strings.
    references: list of strings, or list of lists of strings (several references).
    rouge_types: subset of ["rouge1", "rouge2", "rougeL"] (default: all three).
    use_stemmer: Porter-stem English words longer than 3 characters (default False).
    use_aggregator: True (default) returns the mean over scored predictions; False returns
        one value per prediction (None where there is no reference or no prediction).
Returns:
    {"rouge1": ..., "rouge2": ..., "rougeL": ...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True,
                 workers=1):
        types = list(rouge_types or ROUGE_KEYS)
        unknown = set(types) - set(ROUGE_KEYS)
        if unknown:
            raise ValueError(f"unsupported rouge_types {sorted(unknown)}; supported: {list(ROUGE_KEYS)}")
        scores = compute(predictions, references, ["rouge"], use_stemmer=use_stemmer, workers=workers)
        out = {}
        for key in types:
            vals = scores[key]
            if use_aggregator:
                ok = ~np.isnan(vals)
                out[key] = float(vals[ok].mean()) if ok.any() else None
            else:
                out[key] = [None if np.isnan(v) else float(v) for v in vals]
        return out
