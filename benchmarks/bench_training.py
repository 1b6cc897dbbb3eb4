"""DPO training end to end against TRL's DPOTrainer, and the loop against a straightforward one.

    python benchmarks/bench_training.py                 # e2e: TRL vs `dpoflow train`, both sizes, 3 rounds
    python benchmarks/bench_training.py --quick         # e2e, small and 1 round (about a minute)
    python benchmarks/bench_training.py --worker        # e2e, also dpoflow with train.in_process=false
    python benchmarks/bench_training.py --mode loop     # the trainer's loop vs a naive DPO loop

e2e (needs `pip install -r benchmarks/requirements-training.txt`: trl, a benchmark-only extra):
each round runs, alternating, one TRL process (DPOTrainer, live reference model, plain-text
prompt / chosen / rejected rows, fp32: `bf16=False`, since TRL 1.16 otherwise autocasts to bf16
even on CPU) and one `python -m dpoflow train` process (workspace and config
loading, reference log-probs, training, registration of the candidate; no eval, no promotion)
on the same tiny model and the same 240 pairs, for both sizes of issue 18 (batch 8 x length 256 x
30 steps; batch 16 x length 512 x 20 steps). Reported per process: whole-process wall, CPU
seconds, peak RSS of the whole process tree (sampled from /proc every 20 ms: the sum over the
process and all its descendants), train-loop tokens/s (real tokens of the timed steps / their
seconds; the first step is not timed) and the padding share of the loop's batches.

loop mode, "naive": policy + live reference model, separate chosen / rejected forwards, full-vocabulary
logits + log_softmax, plain AdamW. "dpoflow": tasks.training.trainer.train with stored
reference log-probs (computed once per data version by the ref_logps stage, outside the timing),
one forward over chosen+rejected, chunked lm-head log-softmax at completion positions only,
length-grouped batches. Each variant runs in its own process; peak memory is the rise of the
process's peak RSS over its RSS after setup (model loaded, data tokenized).
"""

from __future__ import annotations

import argparse
import json
import os
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


SIZES = {"small": dict(batch=8, max_length=256, steps=30), "large": dict(batch=16, max_length=512, steps=20)}
LR = 1e-5


def _tree_rss_mb(root: int) -> float:
    """RSS of `root` and all its descendants, from /proc (pages x page size)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            pid, ppid = int(d.name), int(fields[1])
            rss[pid] = int(fields[21])
            children.setdefault(ppid, []).append(pid)
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total * resource.getpagesize() / 2**20


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; wall, CPU seconds of it and its descendants, peak tree RSS, its last JSON line."""
    import threading

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{err[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    try:
        parsed = json.loads(out)  # `dpoflow ... --json` prints one indented document
    except ValueError:
        lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
        parsed = json.loads(lines[-1]) if lines else {}
    return {"wall_s": wall, "cpu_s": cpu, "peak_tree_mb": peak[0], "out": parsed}


def run_trl(args) -> dict:
    """TRL's DPOTrainer on the same rows; loop tokens/s and padding from its own batches."""
    import pyarrow.parquet as pq
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    table = pq.read_table(args.data)
    ds = Dataset.from_dict({k: table.column(k).to_pylist() for k in ("prompt", "chosen", "rejected")})
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    counts: list[tuple[int, int]] = []
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                        learning_rate=LR, beta=0.1, max_length=args.max_length, logging_steps=10**6,
                        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                        precompute_ref_log_probs=args.trl_precompute, dataloader_num_workers=0,
                        bf16=False)  # TRL 1.16 defaults to bf16 autocast even on CPU; dpoflow runs fp32 here
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
        collate = trainer.data_collator

        def counting(examples):
            batch = collate(examples)
            counts.append((int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())))
            return batch

        trainer.data_collator = counting
        trainer.train()
    real = [c[0] for c in counts[-len(times):]]
    slots = [c[1] for c in counts[-len(times):]]
    return {"tokens_per_s": sum(real[1:]) / sum(times[1:]), "padding_share": 1 - sum(real) / sum(slots),
            "steps": len(times)}


def prepare(root: Path, vocab: int, pairs: int) -> dict:
    """The model, the pairs as Parquet (TRL's input) and a dpoflow workspace holding both."""
    import pyarrow.parquet as pq

    from dpoflow.flows.workspace import Workspace

    model = root / "model"
    build_model(model, vocab)
    table = make_pairs(pairs)
    pq.write_table(table, root / "pairs.parquet")
    ws = Workspace.open(root / "ws")
    ws.registry.register(model, tags=["production"], note="bench base")
    rows = table.append_column("prompt_id", pa.array([f"q{i}" for i in range(pairs)]))
    for col, vals in (("chosen_id", [f"c{i}" for i in range(pairs)]), ("rejected_id", [f"r{i}" for i in range(pairs)]),
                      ("source", ["imported"] * pairs), ("strategy", ["imported"] * pairs)):
        rows = rows.append_column(col, pa.array(vals))
    ws.store.write("dpo_train", rows)
    return {"model": model, "data": root / "pairs.parquet", "ws": root / "ws"}


def dpoflow_cmd(paths: dict, size: dict, extra: list[str]) -> list[str]:
    sets = {"max_length": size["max_length"], "batch_size": size["batch"], "max_steps": size["steps"], "lr": LR,
            "checkpoint_every": 0, "chat_template": "never", "log_every": 10**6}
    cmd = [sys.executable, "-m", "dpoflow", "train", "--workspace", str(paths["ws"]), "--data", "dpo_train@0",
           "--eval", "none", "--no-promote", "--force", "--json"]
    for k, v in sets.items():
        cmd += ["--set", f"train.{k}={v}"]
    for e in extra:
        cmd += ["--set", e]
    return cmd


def trl_cmd(paths: dict, size: dict, precompute: bool) -> list[str]:
    return [sys.executable, __file__, "--variant", "trl", "--model", str(paths["model"]), "--data", str(paths["data"]),
            "--steps", str(size["steps"]), "--batch", str(size["batch"]), "--max-length", str(size["max_length"])] + (
        ["--trl-precompute"] if precompute else [])


def dpoflow_loop(paths: dict) -> dict:
    from dpoflow.flows.workspace import Workspace

    ws = Workspace.open(paths["ws"])
    s = json.loads(ws.store.read("train_runs@latest").column("summary")[0].as_py())
    return {"tokens_per_s": s["tokens_per_s"], "padding_share": s["padding_share"], "phases": s.get("phases", {})}


def main_e2e(args) -> None:
    sizes = {"small": SIZES["small"]} if args.quick else SIZES
    rounds = 1 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as d:
        paths = prepare(Path(d), args.vocab, args.pairs)
        rows: dict[tuple[str, str], list[dict]] = {}
        for r in range(rounds):
            for name, size in sizes.items():
                order = ["dpoflow", "trl"] + (["dpoflow-worker"] if args.worker else [])
                for v in (order if r % 2 == 0 else order[::-1]):
                    if v == "trl":
                        m = measure(trl_cmd(paths, size, args.trl_precompute))
                        m.update(m.pop("out"))
                    else:
                        extra = args.set + (["train.in_process=false"] if v == "dpoflow-worker" else [])
                        m = measure(dpoflow_cmd(paths, size, extra))
                        m.pop("out")
                        m.update(dpoflow_loop(paths))
                    m["load"] = os.getloadavg()[0]
                    m["cpu_s_per_wall_s"] = m["cpu_s"] / m["wall_s"]
                    rows.setdefault((name, v), []).append(m)
                    print(json.dumps({"round": r, "size": name, "variant": v,
                                      **{k: (round(x, 3) if isinstance(x, float) else x) for k, x in m.items()}}),
                          flush=True)
    print(f"\npairs={args.pairs} vocab={args.vocab} rounds={rounds} (min .. max over rounds; load = 1-min load average)")
    print("| size | variant | whole-process wall s | CPU s | peak tree RSS MB | loop tokens/s | padding share | load |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, v), ms in rows.items():
        size = sizes[name]

        def rng(k: str, fmt: str = "{:.1f}", ms: list[dict] = ms) -> str:
            vals = [m[k] for m in ms]
            return fmt.format(min(vals)) + ("" if len(vals) == 1 else " .. " + fmt.format(max(vals)))

        print(f"| b{size['batch']} x len {size['max_length']} x {size['steps']} steps | {v} | {rng('wall_s')} | "
              f"{rng('cpu_s')} | {rng('peak_tree_mb', '{:.0f}')} | {rng('tokens_per_s', '{:.0f}')} | "
              f"{rng('padding_share', '{:.3f}')} | {rng('load')} |")
    med = lambda ms, k: float(np.median([m[k] for m in ms]))  # noqa: E731
    for name in sizes:
        t = rows[(name, "trl")]
        for v in [v for (n, v) in rows if n == name and v != "trl"]:
            o = rows[(name, v)]
            print(f"{name} {v}: wall {med(o, 'wall_s') / med(t, 'wall_s'):.2f}x TRL (target <= 0.8), "
                  f"CPU s {med(o, 'cpu_s') / med(t, 'cpu_s'):.2f}x, "
                  f"RSS {med(o, 'peak_tree_mb') / med(t, 'peak_tree_mb'):.2f}x (<= 1), "
                  f"loop {med(o, 'tokens_per_s') / med(t, 'tokens_per_s'):.2f}x (>= 3), "
                  f"padding {med(o, 'padding_share'):.3f} (<= 0.10); phases (s): {o[-1].get('phases')}")


def main_loop(args) -> None:
    if args.quick:
        args.pairs, args.steps, args.batch = 64, 5, 4
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



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["e2e", "loop"], default="e2e")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variant", choices=["naive", "ours", "trl"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--trl-precompute", action="store_true", help="TRL with precompute_ref_log_probs=True")
    ap.add_argument("--set", action="append", default=[], help="extra train.key=value for the dpoflow runs")
    ap.add_argument("--worker", action="store_true",
                    help="also run dpoflow with train.in_process=false (a child worker process) as its own variant")
    args = ap.parse_args()
    if args.variant:
        if args.pairs is None:
            args.pairs = 256
        run = {"naive": run_naive, "ours": run_ours, "trl": run_trl}[args.variant]
        print(json.dumps(run(args)))
        return
    if args.mode == "loop":
        args.pairs = args.pairs or 256
        main_loop(args)
    else:
        args.pairs = args.pairs or 240
        main_e2e(args)


if __name__ == "__main__":
    main()
