"""Trainer vs a straightforward DPO loop: tokens/s and peak memory on CPU, same data and batch.

    python benchmarks/bench_training.py            # default size
    python benchmarks/bench_training.py --quick    # seconds

"naive": policy + live reference model, separate chosen / rejected forwards, full-vocabulary
logits + log_softmax, plain AdamW. "dpoflow": tasks.training.trainer.train with stored
reference log-probs (computed once per data version by the ref_logps stage, outside the timing),
one forward over chosen+rejected, chunked lm-head log-softmax at completion positions only,
length-grouped batches. Each variant runs in its own process; peak memory is the rise of the
process's peak RSS over its RSS after setup (model loaded, data tokenized).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_pairs(n: int, seed: int = 0) -> pa.Table:
    from dpoflow.tasks.tiny_model import corpus

    rng = np.random.default_rng(seed)
    sents = corpus()
    rows = []
    for i in range(n):
        pick = lambda k: " ".join(sents[j] for j in rng.integers(0, len(sents), k))  # noqa: E731
        rows.append({"pair_id": f"p{i}", "prompt": pick(int(rng.integers(1, 4))),
                     "chosen": pick(int(rng.integers(2, 8))), "rejected": pick(int(rng.integers(2, 8)))})
    return pa.Table.from_pylist(rows)


def build_model(out: Path, vocab: int) -> None:
    from dpoflow.tasks.tiny_model import build_tiny_model

    build_tiny_model(out, vocab_size=vocab, hidden_size=128, layers=2, heads=4, intermediate_size=256,
                     max_position=2048)


def run_naive(args) -> dict:
    import torch
    import torch.nn.functional as F

    from dpoflow.tasks.training.config import TrainConfig
    from dpoflow.tasks.training.logprobs import load_causal_lm
    from dpoflow.tasks.training.tokenization import tokenize_pairs

    torch.manual_seed(0)
    policy, tok = load_causal_lm(args.model)
    ref, _ = load_causal_lm(args.model)
    ref.eval()
    cfg = TrainConfig(max_length=args.max_length, max_prompt_length=args.max_length // 2)
    tp = tokenize_pairs(make_pairs(args.pairs), tok, cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    order = np.random.default_rng(0).permutation(len(tp))

    def side(model, idx, comps):
        seqs = [np.concatenate([tp.prompt[i], comps[i]]) for i in idx]
        width = max(map(len, seqs))
        ids = torch.full((len(idx), width), tp.pad_id)
        labels = torch.full((len(idx), width), -100)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, (i, s) in enumerate(zip(idx, seqs, strict=True)):
            ids[r, :len(s)] = torch.from_numpy(s)
            mask[r, :len(s)] = 1
            labels[r, len(tp.prompt[i]):len(s)] = torch.from_numpy(comps[i])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        lab = labels[:, 1:]
        return (logp.gather(2, lab.clamp(min=0)[..., None]).squeeze(-1) * (lab != -100)).sum(1), int(mask.sum())

    base = rss_mb()
    times, toks = [], []
    for step in range(args.steps):
        idx = order[(step * args.batch) % (len(tp) - args.batch):][:args.batch]
        t0 = time.perf_counter()
        pc, n1 = side(policy, idx, tp.chosen)
        pr, n2 = side(policy, idx, tp.rejected)
        with torch.no_grad():
            rc, _ = side(ref, idx, tp.chosen)
            rr, _ = side(ref, idx, tp.rejected)
        loss = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        toks.append(n1 + n2)
    return {"tokens_per_s": sum(toks[1:]) / sum(times[1:]), "peak_mb": peak_mb() - base}


def run_ours(args) -> dict:
    import torch

    from dpoflow.tasks.training.config import TrainConfig
    from dpoflow.tasks.training.logprobs import compute_ref_logps, load_causal_lm, ref_logps_table
    from dpoflow.tasks.training.tokenization import tokenize_pairs
    from dpoflow.tasks.training.trainer import train

    torch.manual_seed(0)
    cfg = TrainConfig(max_length=args.max_length, max_prompt_length=args.max_length // 2, lr=1e-5,
                      batch_size=args.batch, max_steps=args.steps, checkpoint_every=0, logit_chunk=256,
                      log_every=10**6)
    table = make_pairs(args.pairs)
    model, tok = load_causal_lm(args.model)
    tp = tokenize_pairs(table, tok, cfg)
    ref = ref_logps_table(tp, compute_ref_logps(model, tp, 16), "bench")  # the ref_logps stage, stored
    del model
    base = rss_mb()
    with tempfile.TemporaryDirectory() as d:
        res = train(cfg, table, args.model, d, ref_logps=ref)
    m = res.metrics[1:]
    tps = sum(x["tokens_per_s"] * x["seconds"] for x in m) / sum(x["seconds"] for x in m)
    # the policy is loaded inside train(), so its weights count in this rise too (conservative)
    return {"tokens_per_s": tps, "peak_mb": peak_mb() - base, "padding_share": res.summary["padding_share"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variant", choices=["naive", "ours"])
    ap.add_argument("--model")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.steps, args.batch = 64, 5, 4
    if args.variant:
        print(json.dumps((run_naive if args.variant == "naive" else run_ours)(args)))
        return
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "model"
        build_model(model, args.vocab)
        rows = {}
        for v in ("naive", "ours"):
            cmd = [sys.executable, __file__, "--variant", v, "--model", str(model), "--pairs", str(args.pairs),
                   "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{v} failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout
            rows[v] = json.loads(out.strip().splitlines()[-1])
    n, o = rows["naive"], rows["ours"]
    print(f"pairs={args.pairs} steps={args.steps} batch={args.batch} max_length={args.max_length} vocab={args.vocab}")
    print("| variant | tokens/s | peak memory rise (MiB) |")
    print("| --- | ---: | ---: |")
    print(f"| naive (live ref, separate forwards, full logits) | {n['tokens_per_s']:.0f} | {n['peak_mb']:.0f} |")
    print(f"| dpoflow trainer (stored ref, one forward, chunked) | {o['tokens_per_s']:.0f} | {o['peak_mb']:.0f} |")
    print(f"| ratio | {o['tokens_per_s'] / n['tokens_per_s']:.2f}x | {o['peak_mb'] / max(n['peak_mb'], 1e-9):.2f}x |")
    print(f"padding share (dpoflow, length-grouped): {o['padding_share']:.3f}")


if __name__ == "__main__":
    main()
