"""Evaluation of a trained policy: held-out preference metrics, a generation comparison with
the production model, training curves and a markdown report.

Public API:

    EvalConfig                                   ``ws.config.train.eval``.
    preference_metrics(policy_c, policy_r, ref_c, ref_r, tokens_c, tokens_r, cfg) -> dict
        pure (numpy in, floats out): reward accuracy, margins and loss of the configured
        objective, computed by :class:`dpoflow.tasks.training.losses.PreferenceLoss` itself, so the
        eval loss is exactly the training loss on held-out pairs.
    evaluate_preferences(model, tokenizer, pairs, ref_table, cfg, ecfg, device) -> (dict, pa.Table)
    held_out_prompts(pairs, n) -> (prompt_ids, prompts, references)
    score_responses(responses, references, prompts, ecfg) -> np.ndarray   higher is better.
    win_rate(new_scores, base_scores, tol) -> dict
    generation_comparison(new, base, pairs, ecfg, device) -> dict   (new/base: (model, tokenizer))
    evaluate_model(model_dir, pairs, ref_table, cfg, ecfg, *, baseline_dir=None) -> EvalResult
    plot_training_curves(history, path) -> Path | None     PNG (matplotlib Agg).
    eval_report_markdown(...) -> str

Reward of a pair side = β·(log πθ(y|x) − log π_ref(y|x)) (β·logπ/n for reference-free losses).
Reward accuracy = share of pairs with chosen reward strictly above the rejected one (a tie
is not a win: an untrained policy equal to its reference scores 0, not 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from dpoflow.tasks.contract import Section

METRICS = ("bleu", "rouge1", "rouge2", "rougeL")


class EvalConfig(Section):
    enabled: bool = Field(True, description="evaluate the trained model on dpo_eval when one is given")
    max_pairs: int | None = Field(None, ge=1, description="cap on dpo_eval pairs scored (first by pair_id); "
                                  "None = all")
    generate: bool = Field(True, description="compare generations of the new and the production model")
    n_prompts: int = Field(32, ge=1, description="held-out prompts (distinct dpo_eval prompts, by prompt_id) "
                           "for the generation comparison")
    max_new_tokens: int = Field(64, ge=1, description="generated tokens per response")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 = greedy (deterministic)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling cut (temperature > 0 only)")
    seed: int = Field(0, description="sampling seed (per prompt, so both models see the same draws)")
    scorer: Literal["reference", "reward_model"] = Field(
        "reference", description="how a response is scored: reference = the scoring stage's sentence "
        "metric against the pair's chosen response; reward_model = a sequence classifier")
    metric: Literal["bleu", "rouge1", "rouge2", "rougeL"] = Field(
        "rougeL", description="metric of the reference scorer (CJK-aware, tasks.metrics)")
    reward_model: str | None = Field(None, description="local folder or models@... of a reward model "
                                     "(scorer=reward_model)")
    tie_tolerance: float = Field(1e-9, ge=0, description="score difference counted as a tie (half a win)")


# --- preference metrics -----------------------------------------------------------------------

def preference_metrics(policy_chosen: np.ndarray, policy_rejected: np.ndarray,
                       ref_chosen: np.ndarray | None, ref_rejected: np.ndarray | None,
                       chosen_tokens: np.ndarray, rejected_tokens: np.ndarray, cfg: Any
                       ) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """Held-out metrics of the configured objective; returns (metrics, chosen_r, rejected_r, loss)."""
    import torch

    from dpoflow.tasks.training.losses import LogpBatch, PreferenceLoss

    def t(x: np.ndarray | None) -> torch.Tensor | None:
        return None if x is None else torch.as_tensor(np.asarray(x, np.float64))

    loss = PreferenceLoss.from_config(cfg)
    n = len(policy_chosen)
    if n == 0:
        return {"n_pairs": 0}, np.zeros(0), np.zeros(0), np.zeros(0)
    with torch.no_grad():
        terms = loss.terms(LogpBatch(t(policy_chosen), t(policy_rejected), t(chosen_tokens), t(rejected_tokens),
                                     t(ref_chosen), t(ref_rejected)))
    cr = terms.chosen_rewards.numpy()
    rr = terms.rejected_rewards.numpy()
    pl = terms.pair_losses.detach().numpy()
    m = {
        "n_pairs": int(n),
        "reward_accuracy": float(np.mean(cr > rr)),
        "reward_margin": float(np.mean(cr - rr)),
        "chosen_reward": float(np.mean(cr)),
        "rejected_reward": float(np.mean(rr)),
        "eval_loss": float(np.mean(pl)),
        "policy_chosen_logp": float(np.mean(policy_chosen)),
        "policy_rejected_logp": float(np.mean(policy_rejected)),
    }
    return m, cr, rr, pl


def _cap_pairs(pairs: pa.Table, max_pairs: int | None) -> pa.Table:
    if max_pairs is None or pairs.num_rows <= max_pairs:
        return pairs
    return pairs.take(pc.sort_indices(pairs, [("pair_id", "ascending")])[:max_pairs])


def evaluate_preferences(model: Any, tokenizer: Any, pairs: pa.Table, ref_table: pa.Table | None, cfg: Any,
                         ecfg: EvalConfig, device: str = "cpu") -> tuple[dict[str, Any], pa.Table]:
    """Policy log-probs on held-out pairs (same tokenization as training) + stored reference."""
    from dpoflow.tasks.training.logprobs import align_ref_logps, compute_ref_logps
    from dpoflow.tasks.training.tokenization import tokenize_pairs

    pairs = _cap_pairs(pairs, ecfg.max_pairs)
    tokenized = tokenize_pairs(pairs, tokenizer, cfg)
    pol = compute_ref_logps(model, tokenized, batch_size=cfg.eval_batch_size, device=device,
                            chunk=cfg.logit_chunk, precision=cfg.precision)
    ref_c = ref_r = None
    if cfg.needs_reference:
        if ref_table is None:
            raise ValueError("the loss needs reference log-probs of dpo_eval and none were given")
        ref_c, ref_r = align_ref_logps(tokenized, ref_table)
    m, cr, rr, pl = preference_metrics(pol.chosen_logp, pol.rejected_logp, ref_c, ref_r,
                                       pol.chosen_tokens, pol.rejected_tokens, cfg)
    m["tokenize"] = tokenized.stats.as_dict()
    per_pair = pa.table({
        "pair_id": pa.array(list(tokenized.pair_ids), pa.string()),
        "chosen_reward": pa.array(cr, pa.float64()),
        "rejected_reward": pa.array(rr, pa.float64()),
        "loss": pa.array(pl, pa.float64()),
        "correct": pa.array(cr > rr, pa.bool_()),
    })
    return m, per_pair


# --- generation comparison --------------------------------------------------------------------

def held_out_prompts(pairs: pa.Table, n: int) -> tuple[list[str], list[Any], list[str]]:
    """The first `n` distinct prompts of dpo_eval (by prompt_id), with the chosen response of
    their first pair as the reference answer."""
    order = pc.sort_indices(pairs, [("prompt_id", "ascending"), ("pair_id", "ascending")])
    t = pairs.take(order)
    ids = t.column("prompt_id").to_numpy(zero_copy_only=False)
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])[:n]
    t = t.take(pa.array(first))
    msgs = (t.column("prompt_messages").to_pylist() if "prompt_messages" in t.column_names
            else [None] * t.num_rows)
    prompts = [m if m else p for m, p in zip(msgs, t.column("prompt").to_pylist(), strict=True)]
    return t.column("prompt_id").to_pylist(), prompts, t.column("chosen").to_pylist()


def _reward_scores(path: str | Path, prompts: Sequence[Any], responses: Sequence[str | None]) -> np.ndarray:
    """Scalar reward (first logit) of prompt + response from a local sequence classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpoflow.tasks.generation import render_prompts

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    texts, _ = render_prompts(tok, list(prompts))
    full = [f"{p}{r}" for p, r in zip(texts, responses, strict=True)]
    out = np.full(len(full), np.nan)
    with torch.inference_mode():
        for s in range(0, len(full), 16):
            enc = tok(full[s:s + 16], return_tensors="pt", padding=True, truncation=True, max_length=1024)
            out[s:s + 16] = model(**enc).logits[:, 0].double().numpy()
    return np.where([r is None for r in responses], np.nan, out)


def score_responses(responses: Sequence[str | None], references: Sequence[Any], prompts: Sequence[Any],
                    ecfg: EvalConfig, reward_model_path: str | Path | None = None) -> np.ndarray:
    """Score generated responses (higher is better; NaN = not scorable) with the scoring stage's
    metric against the references, or with a reward model."""
    if ecfg.scorer == "reward_model":
        if reward_model_path is None:
            raise ValueError("eval.scorer=reward_model needs eval.reward_model")
        return _reward_scores(reward_model_path, prompts, responses)
    from dpoflow.tasks.metrics.fast import compute

    kind = "bleu" if ecfg.metric == "bleu" else "rouge"
    return np.asarray(compute(list(responses), list(references), metrics=(kind,), workers=1)[ecfg.metric], float)


def win_rate(new: np.ndarray, base: np.ndarray, tol: float = 1e-9) -> dict[str, Any]:
    """Share of prompts where the new model scores higher; ties count half; NaN rows left out."""
    new, base = np.asarray(new, float), np.asarray(base, float)
    ok = np.isfinite(new) & np.isfinite(base)
    d = new[ok] - base[ok]
    wins, ties = int((d > tol).sum()), int((np.abs(d) <= tol).sum())
    losses = int(ok.sum()) - wins - ties
    n = int(ok.sum())
    return {"win_rate": (wins + 0.5 * ties) / n if n else None, "wins": wins, "ties": ties, "losses": losses,
            "n_compared": n, "n_unscored": int((~ok).sum()),
            "new_score": float(new[ok].mean()) if n else None, "base_score": float(base[ok].mean()) if n else None}


def generation_comparison(new: tuple[Any, Any], base: tuple[Any, Any], pairs: pa.Table, ecfg: EvalConfig,
                          device: str = "cpu", reward_model_path: str | Path | None = None) -> dict[str, Any]:
    """Generate with both models on the same held-out prompts and seeds, score, count wins."""
    from dpoflow.tasks.generation import GenParams, generate_responses

    pids, prompts, refs = held_out_prompts(pairs, ecfg.n_prompts)
    params = GenParams(n=1, temperature=ecfg.temperature, top_p=ecfg.top_p,
                       max_new_tokens=ecfg.max_new_tokens, seed=ecfg.seed)

    def texts(model_tok: tuple[Any, Any]) -> list[str | None]:
        res = generate_responses(model_tok[0], model_tok[1], prompts, params, keys=pids, device=device,
                                 too_long="truncate")
        return [r.generations[0].text if r.generations else None for r in res]

    new_txt, base_txt = texts(new), texts(base)
    s_new = score_responses(new_txt, refs, prompts, ecfg, reward_model_path)
    s_base = score_responses(base_txt, refs, prompts, ecfg, reward_model_path)
    out = win_rate(s_new, s_base, ecfg.tie_tolerance)
    out["flagged_share"], out["baseline_flagged_share"] = flagged_share(prompts, new_txt), flagged_share(prompts, base_txt)
    out["scorer"] = ecfg.scorer if ecfg.scorer == "reward_model" else f"{ecfg.metric} vs chosen"
    out["examples"] = [{"prompt_id": p, "new": a, "production": b, "new_score": _f(x), "production_score": _f(y)}
                       for p, a, b, x, y in list(zip(pids, new_txt, base_txt, s_new, s_base, strict=True))[:3]]
    return out


def flagged_share(prompts: Sequence[str], texts: Sequence[str | None]) -> float | None:
    """Share of outputs that a rule check flags (empty, broken bytes, loops, ...): the promotion
    gate's non-regression check on output health."""
    from dpoflow.tasks.rules import FLAGS, check

    if not texts:
        return None
    flags = check(pa.array(list(prompts), pa.string()), pa.array(list(texts), pa.string()))
    any_flag = np.zeros(len(texts), dtype=bool)
    for f in FLAGS:
        any_flag |= np.asarray(flags.column(f).to_numpy(zero_copy_only=False), dtype=bool)
    return float(any_flag.mean())


def _f(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


# --- the whole evaluation of one model --------------------------------------------------------

@dataclass
class EvalResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # flat numbers for the gate
    per_pair: pa.Table | None = None
    generation: dict[str, Any] | None = None


def evaluate_model(model_dir: str | Path, pairs: pa.Table, ref_table: pa.Table | None, cfg: Any, ecfg: EvalConfig,
                   *, baseline_dir: str | Path | None = None, reward_model_path: str | Path | None = None,
                   device: str | None = None) -> EvalResult:
    """Preference metrics on dpo_eval, then (if a baseline is given) the generation comparison."""
    from dpoflow.tasks.generation import pick_device
    from dpoflow.tasks.training.logprobs import load_causal_lm

    device = device or pick_device()
    model, tok = load_causal_lm(model_dir, device=device)
    model.eval()
    metrics, per_pair = evaluate_preferences(model, tok, pairs, ref_table, cfg, ecfg, device)
    gen = None
    if ecfg.generate and baseline_dir is not None:
        base = load_causal_lm(baseline_dir, device=device)
        base[0].eval()
        base_metrics, _ = evaluate_preferences(base[0], base[1], pairs, ref_table, cfg, ecfg, device)
        metrics["baseline_reward_accuracy"] = base_metrics.get("reward_accuracy")  # non-regression check
        gen = generation_comparison((model, tok), base, pairs, ecfg, device, reward_model_path)
        metrics["win_rate"] = gen["win_rate"]
    elif ecfg.generate:
        metrics["win_rate_skipped"] = "no production model to compare with"
    return EvalResult(metrics, per_pair, gen)


# --- curves and report ------------------------------------------------------------------------

_CURVE_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
               "grad_norm", "lr", "tokens_per_s", "padding_share")


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path,
                         eval_points: Sequence[dict[str, Any]] = ()) -> Path | None:
    """One panel per logged metric against the optimizer step; None when nothing was logged."""
    rows = [r for r in history if isinstance(r.get("step"), int | float)]
    keys = [k for k in _CURVE_KEYS if any(_is_num(r.get(k)) for r in rows)]
    if not keys:
        keys = sorted({k for r in rows for k, v in r.items() if k != "step" and _is_num(v)})[:8]
    if not keys:
        return None
    # the object API with the Agg canvas: no pyplot (its import and backend set-up cost ~0.5 s)
    # and fixed margins instead of tight_layout (~0.4 s of text measuring per call)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        pts = [(r["step"], float(r[k])) for r in rows if _is_num(r.get(k))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ev = [(r["step"], float(r[k])) for r in eval_points if _is_num(r.get(k))]
        if ev:
            ax.plot([p[0] for p in ev], [p[1] for p in ev], "o", ms=4, label="eval")
            ax.legend(fontsize=7)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)  # fewer ticks: drawing tick labels is most of the render time
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.5 / (2.8 * nrows), top=1 - 0.3 / (2.8 * nrows),
                        wspace=0.32, hspace=0.6)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def metrics_table(rows: dict[str, Any]) -> str:
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows.items() if not isinstance(v, dict | list)]
    return "\n".join(lines)


def eval_report_markdown(model_version: str, *, train_data: str, eval_data: str | None, baseline: str | None,
                         metrics: dict[str, Any], generation: dict[str, Any] | None,
                         train_summary: dict[str, Any] | None = None, curves: str | Path | None = None,
                         decision: dict[str, Any] | None = None) -> str:
    """A human-readable report of one trained model (workspace artifact + Prefect artifact)."""
    out = [f"# Evaluation of `{model_version}`", "",
           f"- trained on `{train_data}`", f"- evaluated on `{eval_data or 'no dpo_eval given'}`",
           f"- compared with production `{baseline or 'none'}`", ""]
    if train_summary:
        out += ["## Training", "", metrics_table(train_summary), ""]
    if curves:
        out += [f"![training curves]({curves})", ""]
    out += ["## Held-out preference metrics", "", metrics_table(metrics), ""]
    if generation:
        out += ["## Generation comparison", "",
                f"{generation['n_compared']} prompts scored by {generation['scorer']}: "
                f"{generation['wins']} wins, {generation['ties']} ties, {generation['losses']} losses "
                f"→ win rate **{_fmt(generation['win_rate'])}**", ""]
        for ex in generation.get("examples") or []:
            out += [f"- `{ex['prompt_id']}` new ({_fmt(ex['new_score'])}): {str(ex['new'])[:160]!r} / "
                    f"production ({_fmt(ex['production_score'])}): {str(ex['production'])[:160]!r}"]
        out.append("")
    if decision:
        verdict = "PROMOTED" if decision.get("promoted") else ("passed (not promoted)" if decision.get("passed")
                                                                else "not promoted")
        out += ["## Promotion", "", f"**{verdict}**", ""] + [f"- {r}" for r in decision.get("reasons", [])] + [""]
    return "\n".join(out)
