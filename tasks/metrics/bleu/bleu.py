"""Sentence-level BLEU for `evaluate`, CJK-aware, offline (dpoflow's own module).

Same definition and defaults as ``sacrebleu.sentence_bleu`` (tokenize 13a, smoothing
'exp', effective order, 0-100 scale, one or several references per prediction). Text with
CJK characters is tokenized with one character per token (see
``dpoflow.tasks.metrics.tokenize`` for the rule), so Chinese and mixed text get meaningful scores.

Load without the Hub: ``evaluate.load("<dpoflow>/tasks/metrics/bleu")``.
"""

import datasets
import evaluate
import numpy as np

from dpoflow.tasks.metrics.fast import compute

_CITATION = """Papineni et al. (2002) BLEU; Post (2018) A Call for Clarity in Reporting BLEU Scores."""

_DESCRIPTION = """Sentence BLEU per prediction (sacrebleu.sentence_bleu numbers, CJK characters as tokens)."""

_KWARGS = """
Args:
    predictions: list of strings.
    references: list of strings, or list of lists of strings (several references).
    smooth_method: 'exp' (default), 'floor', 'add-k' or 'none'.
    smooth_value: value for 'floor' (0.1) / 'add-k' (1).
    lowercase: lowercase before tokenizing (default False).
    use_aggregator: True (default) returns the mean over scored predictions; False returns
        one value per prediction (None where there is no reference or no prediction).
Returns:
    {"bleu": float or list}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Bleu(evaluate.Metric):
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
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, smooth_method="exp", smooth_value=None, lowercase=False,
                 use_aggregator=True, workers=1):
        scores = compute(predictions, references, ["bleu"], smooth_method=smooth_method,
                         smooth_value=smooth_value, lowercase=lowercase, workers=workers)["bleu"]
        if use_aggregator:
            ok = ~np.isnan(scores)
            return {"bleu": float(scores[ok].mean()) if ok.any() else None}
        return {"bleu": [None if np.isnan(v) else float(v) for v in scores]}
