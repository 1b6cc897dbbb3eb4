"""Reference losses from TRL's DPOTrainer for tests/test_training_trl_parity.py.

    pip install -r benchmarks/requirements-training.txt
    python benchmarks/trl_reference.py            # rewrites tests/data/trl_dpo_reference.json

The tiny model of tasks/tiny_model.py (seed 0), pairs() below as plain text (no chat template),
batch 4 in the table's order (a SequentialSampler instead of TRL's shuffling), 30 steps, linear
decay without warm-up, AdamW (0.9, 0.999), clipping at 1.0, fp32 on CPU: `bf16=False` is set
explicitly, because TRL 1.16's configs default to bf16 mixed precision even with `use_cpu=True`
(CPU bf16 autocast: a step-1 gradient 0.2% off the fp32 one, and losses that drift ~1e-4 from
an fp32 trainer by step 3). The completions start with
a space, so tokenizing prompt + completion in one piece (TRL) and apart (dpoflow) gives the
same ids; the script checks that no row differs and stores the per-step losses at full
precision (TRL's own log rounds them to 4 digits).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "trl_dpo_reference.json"
STEPS, BATCH, LR, BETA = 30, 4, 1e-3, 0.1

_GOOD = [" The answer is clear and correct.", " Here is a short, helpful reply.", " 这是一个清楚的回答。",
         " Python lists keep their order.", " Binary search halves the range.", " 北京是中国的首都。"]
_BAD = [" no", " I do not know.", " 随便", " whatever", " blah blah blah", " 不知道"]


def pairs() -> list[dict]:
    return [{"pair_id": f"p{i:03d}", "prompt": f"Question {i}: tell me about item {i}.",
             "chosen": _GOOD[i % len(_GOOD)] + (f" ({i})" if i % 3 else ""),
             "rejected": _BAD[(i * 5) % len(_BAD)]} for i in range(STEPS * BATCH)]


def main() -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dpoflow.tasks.tiny_model import build_tiny_model
    from dpoflow.tasks.training.config import TrainConfig
    from dpoflow.tasks.training.tokenization import tokenize_pairs

    rows = pairs()
    losses: list[float] = []

    class Recording(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, out = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            losses.append(float(loss.detach()))
            return (loss, out) if return_outputs else loss

    with tempfile.TemporaryDirectory() as d:
        model_dir = build_tiny_model(Path(d) / "model")
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        args = DPOConfig(output_dir=str(Path(d) / "out"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                         learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, beta=BETA,
                         max_length=None, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         disable_tqdm=True, seed=0, max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9,
                         adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", bf16=False)
        trainer = Recording(model=model, args=args, train_dataset=ds, processing_class=tok)
        import pyarrow as pa

        ours = tokenize_pairs(pa.Table.from_pylist(rows), tok, TrainConfig(chat_template="never", max_length=4096))
        differ = sum(
            list(ours.prompt[i]) != list(ex["prompt_ids"]) or list(ours.chosen[i]) != list(ex["chosen_ids"])
            or list(ours.rejected[i]) != list(ex["rejected_ids"]) for i, ex in enumerate(trainer.train_dataset))
        if differ:
            raise SystemExit(f"{differ} rows tokenize differently in TRL and dpoflow; fix PAIRS first")
        trainer.train()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "note": "written by benchmarks/trl_reference.py; TRL DPOTrainer, sequential order, fp32 CPU",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "config": {"steps": STEPS, "batch": BATCH, "lr": LR, "beta": BETA, "scheduler": "linear", "warmup_steps": 0,
                   "adam_betas": [0.9, 0.999], "max_grad_norm": 1.0, "precision": "fp32 (bf16=False)"},
        "token_rows_differ": 0, "losses": losses}, indent=1))
    print(f"wrote {OUT}: {len(losses)} losses, first {losses[0]:.8f}, last {losses[-1]:.8f}")


if __name__ == "__main__":
    main()
