"""Sampling throughput: the stage's batched path vs a naive generate-per-candidate loop.

Same model, prompts and settings on both sides (n candidates per prompt, temperature, top-p,
max_new_tokens); tokens = generated tokens including the end-of-sequence token.

    python benchmarks/bench_sampling.py            # 64 prompts x 4 candidates, tiny model, CPU
    python benchmarks/bench_sampling.py --quick    # seconds
    python benchmarks/bench_sampling.py --shape qwen0.5b --device cuda   # on a GPU
    python benchmarks/bench_sampling.py --runner ray   # the stage inline vs on 1 and 2 Ray workers

Rows: `naive` calls `model.generate` once per prompt and candidate (batch of one, HF's own
sampling); `batched` is tasks.generation.generate_responses (token-budget batches over
length-sorted prompts, num_return_sequences, left padding); `stage` is the whole `sample`
stage through run_stage on a fresh workspace (prompt checks, shards committed to the
store, dedup, candidates written), wall clock including model load.

With `--runner ray` the rows are the `sample` stage run inline, then as the Prefect flow with
`sample.runner=ray` on a private local Ray cluster of 1 and 2 worker CPUs (each shard a Prefect
task run on a Ray worker; every worker loads the model once). The cluster is started before
the run, so its start-up (ray.init + first worker) is its own row and not in the stage rows.
A second table does the same for the reward model's part of the `score` stage on those
candidates (`score.runner=ray`, a tiny reward model, `--reward-shard-size` candidates per shard).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from dpoflow.tasks import generation as gen  # noqa: E402
from dpoflow.tasks.tiny_model import build_tiny_model, build_tokenizer, corpus  # noqa: E402


def make_prompts(k: int) -> list[str]:
    base = corpus()
    return [f"{base[i % len(base)]} ({i})" + (" 请详细说明。" * (i % 5)) for i in range(k)]


def build_model(shape: str, out: Path) -> Path:
    """The tiny test model, or a ~0.5B Qwen2-shaped model with random weights (tiny tokenizer)."""
    if shape == "tiny":
        return build_tiny_model(out)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer(out)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def naive(model, tok, prompts: list[str], p: gen.GenParams, device: str) -> tuple[int, float]:
    """One generate call per prompt and per candidate, HF sampling, batch of one."""
    texts, templated = gen.render_prompts(tok, prompts)
    eos = set(gen.eos_ids(model, tok))
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, text in enumerate(texts):
            enc = tok(text, return_tensors="pt", add_special_tokens=not templated).to(device)
            for j in range(p.n):
                torch.manual_seed(p.seed * 1_000_003 + i * 101 + j)
                out = model.generate(**enc, do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0,
                                     max_new_tokens=p.max_new_tokens, pad_token_id=tok.pad_token_id)
                new = out[0, enc["input_ids"].shape[1]:].tolist()
                cut = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
                tokens += cut
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0


def batched(model, tok, prompts: list[str], p: gen.GenParams, device: str, budget: int) -> tuple[int, float]:
    stats = gen.GenStats()
    t0 = time.perf_counter()
    gen.generate_responses(model, tok, prompts, p, device=device, token_budget=budget, stats=stats)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return stats.generated_tokens, time.perf_counter() - t0


def stage(model_dir: Path, prompts: list[str], p: gen.GenParams, device: str, budget: int) -> tuple[int, float, dict]:
    from dpoflow.flows.sample import sample
    from dpoflow.flows.workspace import Workspace

    with tempfile.TemporaryDirectory() as d:
        ws = Workspace.open(Path(d) / "ws", [
            f"sample.samplers=[{{model: '{model_dir}', n: {p.n}, max_new_tokens: {p.max_new_tokens}, "
            f"temperature: {p.temperature}, top_p: {p.top_p}, seed: {p.seed}}}]",
            f"sample.device={device}", f"sample.token_budget={budget}", "sample.progress_bar=false"])
        ws.store.write("prompts", pa.table({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts}))
        from dpoflow.tasks import sampling

        sampling._MODEL_CACHE.clear()  # count the model load, as a real run would
        t0 = time.perf_counter()
        run = sample(ws)
        return run.report["generated_tokens"], time.perf_counter() - t0, run.report


def _stage_ws(root: Path, model_dir: Path, prompts: list[str], p: gen.GenParams, device: str, budget: int,
              shard_size: int, extra: list[str]):
    from dpoflow.flows.workspace import Workspace

    overrides = [f"sample.samplers=[{{model: '{model_dir}', n: {p.n}, max_new_tokens: {p.max_new_tokens}, "
                 f"temperature: {p.temperature}, top_p: {p.top_p}, seed: {p.seed}}}]",
                 f"sample.device={device}", f"sample.token_budget={budget}", "sample.progress_bar=false",
                 f"sample.shard_size={shard_size}", "sample.cpu_threads=1", *extra]
    ws = Workspace.open(root, overrides)
    ws.store.write("prompts", pa.table({"prompt_id": [f"p{i}" for i in range(len(prompts))], "prompt": prompts}))
    return ws, overrides


def _tokens(ws) -> tuple[int, int]:
    shards = [n for n in ws.store.list() if n.startswith("shard_sample_")]
    tokens = sum(int(ws.store.info(n).extra.get("generated_tokens", 0)) for n in shards)
    return tokens, len(shards)


def _score(ws, run, *args, **kw) -> tuple[int, int, float]:
    """(reward shards, candidates, seconds) of `run(*args, **kw)`, a score run returning its outputs."""
    t0 = time.perf_counter()
    out = run(*args, **kw)
    out = out.outputs if hasattr(out, "outputs") else out
    wall = time.perf_counter() - t0
    shards = [n for n in ws.store.list() if n.startswith("shard_reward_")]
    return len(shards), ws.store.info(out["scores"]).rows, wall


def ray_rows(model_dir: Path, prompts: list[str], p: gen.GenParams, budget: int, shard_size: int,
             workers: list[int], reward_dir: Path, reward_shard_size: int
             ) -> tuple[list[tuple[str, int, int, float, int]], list[tuple[str, int, int, float]]]:
    """(row, shards, tokens, seconds, workers) for inline and each Ray cluster size, plus start-ups;
    and (row, reward shards, candidates, seconds) of the score stage on the same candidates."""
    import ray

    from dpoflow.flows.local_server import flow_run_settings
    from dpoflow.flows.sample import sample, sample_flow
    from dpoflow.flows.score import run_score, score_flow
    from dpoflow.flows.workspace import Workspace
    from dpoflow.tasks import sampling

    reward = [f"score.reward.model={reward_dir}", f"score.reward.shard_size={reward_shard_size}",
              "score.reward.device=cpu"]
    rows, score_rows = [], []
    with tempfile.TemporaryDirectory() as d:
        ws, overrides = _stage_ws(Path(d) / "inline", model_dir, prompts, p, "cpu", budget, shard_size, [])
        sampling._MODEL_CACHE.clear()
        t0 = time.perf_counter()
        sample(ws)
        wall = time.perf_counter() - t0
        tokens, shards = _tokens(ws)
        rows.append(("inline (this process, shards one after the other)", shards, tokens, wall, 1))
        score_ws = Workspace.open(ws.root, overrides + reward)
        score_rows.append(("score inline (reward shards one after the other)",
                           *_score(score_ws, run_score, score_ws)))
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")  # a busy machine
        with flow_run_settings():
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:  # the temporary server is up before any timing
                client.hello()
            for k in workers:
                t0 = time.perf_counter()
                ray.init(address="local", num_cpus=k, include_dashboard=False, object_store_memory=100 * 2**20,
                         log_to_driver=False)
                ray.get(ray.remote(lambda: 0).remote())  # a worker process is up
                rows.append((f"Ray start-up ({k} CPUs: ray.init + first task)", 0, 0, time.perf_counter() - t0, k))
                try:
                    ws, overrides = _stage_ws(Path(d) / f"ray{k}", model_dir, prompts, p, "cpu", budget, shard_size,
                                              ["sample.runner=ray", f"ray.num_cpus={k}"])
                    t0 = time.perf_counter()
                    out = sample_flow(workspace=str(ws.root), overrides=overrides)
                    wall = time.perf_counter() - t0
                    scored = _score(ws, score_flow, workspace=str(ws.root),
                                    overrides=[*overrides, *reward, "score.runner=ray"])
                finally:
                    ray.shutdown()
                assert out["candidates"]
                tokens, shards = _tokens(ws)
                many = "s" if k > 1 else ""
                rows.append((f"Ray runner, {k} worker{many} (Prefect task run per shard)", shards, tokens, wall, k))
                score_rows.append((f"score on Ray, {k} worker{many} (reward shards as task runs)", *scored))
    return rows, score_rows


def main_ray(a: argparse.Namespace) -> int:
    prompts = make_prompts(a.prompts)
    p = gen.GenParams(n=a.n, temperature=1.0, top_p=0.95, max_new_tokens=a.max_new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as d:
        from dpoflow.tasks.tiny_model import build_tiny_classifier

        model_dir = build_model(a.shape, Path(d) / "model")
        reward_dir = build_tiny_classifier(Path(d) / "reward")
        rows, score_rows = ray_rows(model_dir, prompts, p, a.token_budget, a.shard_size, a.workers, reward_dir,
                                    a.reward_shard_size)
    print(f"\nshape={a.shape} device=cpu prompts={a.prompts} n={a.n} max_new_tokens={a.max_new_tokens} "
          f"shard_size={a.shard_size} (1 torch thread per shard)")
    print("| path | shards | tokens | seconds | shards/s | tokens/s |\n|---|---:|---:|---:|---:|---:|")
    for name, shards, tokens, secs, _k in rows:
        rate = (f"{shards / secs:.2f} | {tokens / secs:.0f}") if shards else "- | -"
        print(f"| {name} | {shards or '-'} | {tokens or '-'} | {secs:.2f} | {rate} |")
    print(f"\nscore stage on those candidates (tiny reward model, reward.shard_size={a.reward_shard_size}, "
          "BLEU/ROUGE and rules included; the Ray cluster already up)")
    print("| path | reward shards | candidates | seconds | shards/s | candidates/s |\n|---|---:|---:|---:|---:|---:|")
    for name, shards, n, secs in score_rows:
        print(f"| {name} | {shards} | {n} | {secs:.2f} | {shards / secs:.2f} | {n / secs:.0f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--shape", choices=["tiny", "qwen0.5b"], default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--naive-prompts", type=int, default=0, help="run the naive loop on fewer prompts (0 = all)")
    ap.add_argument("--quick", action="store_true", help="16 prompts x 2 candidates x 16 tokens")
    ap.add_argument("--runner", choices=["inline", "ray"], default="inline",
                    help="ray: the stage inline vs on a local Ray cluster of --workers CPUs")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray cluster sizes (CPUs)")
    ap.add_argument("--shard-size", type=int, default=8, help="prompts per shard (--runner ray)")
    ap.add_argument("--reward-shard-size", type=int, default=16, help="candidates per reward shard (--runner ray)")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.n, a.max_new_tokens = 16, 2, 16
    if a.runner == "ray":
        return main_ray(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = gen.pick_device(a.device)
    prompts = make_prompts(a.prompts)
    p = gen.GenParams(n=a.n, temperature=1.0, top_p=0.95, max_new_tokens=a.max_new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as d:
        model_dir = build_model(a.shape, Path(d) / "model")
        model, tok = gen.load_model(str(model_dir), device=device)
        batched(model, tok, prompts[:2], gen.GenParams(n=1, max_new_tokens=2), device, a.token_budget)  # warm-up
        naive_prompts = prompts[: a.naive_prompts or len(prompts)]
        nt, ns = naive(model, tok, naive_prompts, p, device)
        bt, bs = batched(model, tok, prompts, p, device, a.token_budget)
        del model
        st, ss, rep = stage(model_dir, prompts, p, device, a.token_budget)
    base = nt / ns
    rows = [("naive loop (generate per prompt x candidate)", len(naive_prompts), nt, ns),
            ("batched generate_responses", len(prompts), bt, bs),
            ("sample stage end to end (incl. load + store)", len(prompts), st, ss)]
    print(f"\nshape={a.shape} device={device} threads={torch.get_num_threads()} n={a.n} "
          f"max_new_tokens={a.max_new_tokens} token_budget={a.token_budget}")
    print("| path | prompts | tokens | seconds | tokens/s | speed-up |\n|---|---:|---:|---:|---:|---:|")
    for name, k, t, s in rows:
        print(f"| {name} | {k} | {t} | {s:.2f} | {t / s:.0f} | {t / s / base:.1f}x |")
    print(f"stage report: shards={rep['shards']} candidates={rep['candidates']} "
          f"generation tokens/s={rep['tokens_per_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
