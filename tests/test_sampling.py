"""The sample stage: batched generation from the tiny local model, determinism, dedup,
bad inputs, served responses, and the stage through run_stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from dpoflow.flows.config import ConfigError, load_config
from dpoflow.flows.sample import sample
from dpoflow.flows.workspace import Workspace
from dpoflow.storage.schemas import MESSAGES, PROMPTS
from dpoflow.storage.store import StoreError
from dpoflow.tasks import generation as gen
from dpoflow.tasks import sampling

PLAIN = ["Explain gradient descent.", "请用简单的话解释二分查找。", "Mixed 中英 text, please."]
CHAT = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is DPO?"}]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model is fastest on one thread (and much faster on a busy CI machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return gen.load_model(str(tiny_model_dir))


def _texts(results):
    return [[g.text for g in r.generations] for r in results]


def prompts_table(ids, texts, messages=None) -> pa.Table:
    return pa.table({"prompt_id": ids, "prompt": texts,
                     "messages": pa.array(messages or [None] * len(ids), MESSAGES)},
                    schema=pa.schema([PROMPTS.field(c) for c in ("prompt_id", "prompt", "messages")]))


def open_ws(root, model, **extra) -> Workspace:
    sampler = {"model": str(model), "n": 3, "max_new_tokens": 12, "temperature": [0.8, 1.2], "seed": 7}
    sampler.update(extra.pop("sampler", {}))
    items = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in sampler.items())
    overrides = [f"sample.samplers=[{{{items}}}]", "sample.cpu_threads=1"] + [f"sample.{k}={v}" for k, v in extra.items()]
    return Workspace.open(root, overrides)


# --- generation core ---------------------------------------------------------------------------

def test_chat_template_and_plain_prompts_generate_n_candidates(tiny):
    model, tok = tiny
    texts, templated = gen.render_prompts(tok, PLAIN[:1] + CHAT)
    assert templated
    assert texts[0] == "<|user|>\nExplain gradient descent.<|end|>\n<|assistant|>\n"
    assert texts[1].startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is DPO?") and texts[1].endswith(
        "<|assistant|>\n")
    plain_texts, templated = gen.render_prompts(tok, PLAIN[:1], use_chat_template=False)
    assert not templated and plain_texts == PLAIN[:1]

    params = gen.GenParams(n=4, temperature=1.0, top_p=0.95, top_k=40, max_new_tokens=10, seed=3)
    res = gen.generate_responses(model, tok, PLAIN + CHAT, params)
    ids = gen.encode(tok, gen.render_prompts(tok, PLAIN + CHAT)[0], True)
    for r, x in zip(res, ids, strict=True):
        assert r.skipped is None and len(r.generations) == 4
        assert r.n_prompt_tokens == len(x)
        for g in r.generations:
            assert g.finish_reason in ("eos", "length")
            assert 0 <= g.n_tokens <= 10
            assert g.finish_reason == "eos" or g.n_tokens == 10
    assert len({g.text for g in res[0].generations}) > 1  # sampling, not 4 copies


def test_sampling_is_deterministic_and_independent_of_batching(tiny):
    model, tok = tiny
    params = gen.GenParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=11)
    prompts = PLAIN + CHAT
    a = gen.generate_responses(model, tok, prompts, params, keys=["a", "b", "c", "d"])
    b = gen.generate_responses(model, tok, prompts, params, keys=["a", "b", "c", "d"])
    one_by_one = gen.generate_responses(model, tok, prompts, params, keys=["a", "b", "c", "d"], max_batch_size=1)
    assert _texts(a) == _texts(b) == _texts(one_by_one)
    # the key, not the position, seeds a prompt: reordering moves results with their prompts
    rev = gen.generate_responses(model, tok, prompts[::-1], params, keys=["d", "c", "b", "a"])
    assert _texts(rev)[::-1] == _texts(a)
    other = gen.generate_responses(model, tok, prompts, gen.GenParams(**{**params.__dict__, "seed": 12}),
                                   keys=["a", "b", "c", "d"])
    assert _texts(other) != _texts(a)
    greedy = gen.generate_responses(model, tok, prompts[:1], gen.GenParams(n=3, temperature=0, max_new_tokens=8))
    assert len({g.text for g in greedy[0].generations}) == 1


def test_token_budget_batches_sorted_prompts():
    batches = gen.plan_batches([5, 50, 7, 48, 6], n=2, max_new_tokens=10, token_budget=250, max_batch_size=8)
    assert batches[0] == [1, 3]  # longest first, together: 2 rows x 2 x 60 = 240 <= 250
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    for b in batches:
        longest = max([5, 50, 7, 48, 6][i] for i in b)
        assert len(b) == 1 or len(b) * 2 * (longest + 10) <= 250
    assert gen.plan_batches([3] * 10, n=1, max_new_tokens=1, token_budget=10**6, max_batch_size=4) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_out_of_memory_halves_the_batch_then_fails_with_a_message(tiny):
    model, tok = tiny
    params = gen.GenParams(n=2, max_new_tokens=8, seed=5)
    prompts = PLAIN * 3
    keys = [str(i) for i in range(len(prompts))]
    ref = gen.generate_responses(model, tok, prompts, params, keys=keys)
    sizes: list[int] = []

    def fits_two(rows: int) -> None:
        sizes.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    stats = gen.GenStats()
    got = gen.generate_responses(model, tok, prompts, params, keys=keys, before_generate=fits_two, stats=stats)
    assert _texts(got) == _texts(ref)
    assert stats.oom_splits >= 1 and sizes[0] == 9 and max(sizes[1:]) <= 4
    assert stats.batches == sum(1 for s in sizes if s <= 2)

    def never_fits(rows: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(gen.GenerationOOM, match="lower sample.token_budget"):
        gen.generate_responses(model, tok, prompts, params, keys=keys, before_generate=never_fits)

    def other_error(rows: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        gen.generate_responses(model, tok, prompts, params, before_generate=other_error)


def test_empty_and_too_long_prompts_are_skipped_or_truncated(tiny):
    model, tok = tiny
    params = gen.GenParams(n=2, max_new_tokens=6)
    long = "很长的提示 " * 40
    res = gen.generate_responses(model, tok, ["", "  \n", long, [{"role": "user", "content": " "}], "ok"], params,
                                 max_prompt_tokens=30)
    assert [r.skipped for r in res] == ["empty_prompt", "empty_prompt", "prompt_too_long", "empty_prompt", None]
    assert len(res[4].generations) == 2
    trunc = gen.generate_responses(model, tok, [long], params, max_prompt_tokens=30, too_long="truncate")
    assert trunc[0].truncated and trunc[0].n_prompt_tokens == 30 and len(trunc[0].generations) == 2
    # the model's own context (512) minus max_new_tokens is the default limit
    huge = gen.generate_responses(model, tok, ["x " * 600], params)
    assert huge[0].skipped == "prompt_too_long"


# --- stage pieces ------------------------------------------------------------------------------

def _invalid_utf8(values: list[bytes]) -> pa.Array:
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


def test_check_prompts_quarantines_bad_rows_with_reasons():
    msgs = [None, None, None, None, [{"role": "user", "content": "  "}], [{"role": "user", "content": "hi"}], None,
            None, [{"role": "user", "content": "bad \ufffd text"}]]
    table = pa.table({
        "prompt_id": ["a", "b", "c", "d", "e", "f", "a", None, "g"],
        "prompt": _invalid_utf8([b"fine", b"\xff\xfebroken", b"", "\u3000 \t".encode(), b"", b"",
                                 b"dup id", b"no id", b"x"]),
        "messages": pa.array(msgs, MESSAGES),
    })
    good, quarantine, counts = sampling.check_prompts(table, source="prompts@3")
    assert good.column("prompt_id").to_pylist() == ["a", "f"]
    assert counts == {"non_utf8": 2, "empty_prompt": 3, "duplicate_prompt_id": 1, "missing_prompt_id": 1}
    reasons = dict(zip(quarantine.column("row_index").to_pylist(), quarantine.column("reason").to_pylist(),
                       strict=True))
    assert reasons == {1: "non_utf8", 2: "empty_prompt", 3: "empty_prompt", 4: "empty_prompt",
                       6: "duplicate_prompt_id", 7: "missing_prompt_id", 8: "non_utf8"}
    assert set(quarantine.column("source").to_pylist()) == {"prompts@3"}
    assert "\ufffd" in quarantine.column("raw")[0].as_py()  # the broken bytes are shown, not lost


def test_dedup_keeps_first_identical_response_per_prompt_with_count():
    t = pa.table({"prompt_id": ["p", "p", "p", "p", "q", "q"],
                  "response": ["a b", "a  b", " a b\u3000", "a b c", "a b", "a\u00a0b"]})
    out, dropped = sampling.dedup_responses(t)
    assert dropped == 3
    assert out.column("response").to_pylist() == ["a b", "a b c", "a b"]
    assert out.column("dup_count").to_pylist() == [3, 1, 2]


def test_config_accepts_scalar_grids_and_rejects_bad_values():
    cfg = load_config(overrides=["sample.samplers=[{model: x, temperature: 0.7, top_p: 0.9, top_k: 5}]"])
    s = cfg.sample.samplers[0]
    assert (s.temperature, s.top_p, s.top_k) == ([0.7], [0.9], [5])
    assert s.trust_remote_code is False and cfg.sample.device == "auto"
    with pytest.raises(ConfigError, match="top_p"):
        load_config(overrides=["sample.samplers=[{model: x, top_p: 1.5}]"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(overrides=["sample.samplers=[{model: x, nucleus: 0.5}]"])


def test_model_references_resolve_or_fail_clearly(ws, tiny_model_dir, tmp_path):
    spec = sampling.resolve_model(str(tiny_model_dir))
    assert spec.local_only and spec.version == str(tiny_model_dir.resolve())
    assert sampling.resolve_model("hf:Qwen/Qwen2.5-0.5B").load == "Qwen/Qwen2.5-0.5B"
    hub = sampling.resolve_model("Qwen/Qwen2.5-0.5B")
    assert hub.version == "Qwen/Qwen2.5-0.5B" and not hub.local_only
    with pytest.raises(sampling.ModelNotFound, match="does not exist"):
        sampling.resolve_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(sampling.ModelNotFound, match="hf:gpt2"):
        sampling.resolve_model("gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sampling.ModelNotFound, match="no config.json"):
        sampling.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(StoreError, match="no model"):
        sampling.resolve_model("models@production", ws.registry)
    version = ws.registry.register(tiny_model_dir, tags=["production"])
    reg = sampling.resolve_model("models@production", ws.registry)
    assert reg.version == version and reg.load == str(ws.registry.local_path(version))
    assert (Path(reg.load) / "config.json").exists()


# --- the stage ---------------------------------------------------------------------------------

def _prompts(ws: Workspace) -> str:
    ids = ["p1", "p2", "p3", "p4", "p5"]
    texts = PLAIN + ["What is DPO?", "   "]
    msgs = [None, None, None, CHAT[0], None]
    return ws.store.write("prompts", prompts_table(ids, texts, msgs)).ref


def test_stage_samples_plain_and_chat_prompts_from_the_registry_model(tmp_path, tiny_model_dir):
    ws = open_ws(tmp_path / "ws", "models@production", shard_size=2)
    version = ws.registry.register(tiny_model_dir, tags=["production"])
    _prompts(ws)
    run = sample(ws)
    cands = ws.store.read(run.outputs["candidates"])
    assert set(cands.column("prompt_id").to_pylist()) == {"p1", "p2", "p3", "p4"}
    assert set(cands.column("model_version").to_pylist()) == {version}
    assert set(cands.column("origin").to_pylist()) == {"sampled"}
    assert sorted({round(t, 4) for t in cands.column("temperature").to_pylist()}) == [0.8, 1.2]
    assert sum(cands.column("dup_count").to_pylist()) == 4 * 2 * 3  # prompts x grid x n
    assert cands.column("candidate_id").unique().to_pylist() == cands.column("candidate_id").to_pylist()
    assert set(cands.column("finish_reason").to_pylist()) <= {"eos", "length"}
    assert min(cands.column("n_prompt_tokens").to_pylist()) > 0
    chat = cands.filter(pa.compute.equal(cands.column("prompt_id"), "p4"))
    assert set(chat.column("prompt").to_pylist()) == {"What is DPO?"}
    rep = run.report
    assert rep["quarantined"] == {"empty_prompt": 1} and rep["prompts_in"] == 5
    assert rep["shards"] == 2 and rep["shards_reused"] == 0 and rep["generated_tokens"] > 0
    q = ws.store.read(run.outputs["quarantine"])
    assert q.column("reason").to_pylist() == ["empty_prompt"] and q.column("stage").to_pylist() == ["sample"]
    # unchanged inputs/config/code: the stage is skipped; forced, it recomputes every shard
    assert sample(ws).skipped
    forced = sample(ws, force=True)
    assert not forced.skipped and forced.report["shards_reused"] == 0
    assert ws.store.read(forced.outputs["candidates"]).equals(cands)
    # promoting another model moves models@production: the same config samples again
    from dpoflow.tasks.tiny_model import build_tiny_model

    newer = ws.registry.register(build_tiny_model(tmp_path / "newer", seed=1), tags=["production"])
    promoted = sample(ws)
    assert not promoted.skipped and promoted.report["shards_reused"] == 0
    assert set(ws.store.read(promoted.outputs["candidates"]).column("model_version").to_pylist()) == {newer}
    # a new seed resamples
    ws2 = open_ws(tmp_path / "ws", "models@production", shard_size=2, sampler={"seed": 8})
    other = ws2.store.read(sample(ws2).outputs["candidates"])
    assert other.column("response").to_pylist() != cands.column("response").to_pylist()


def test_stage_dedups_greedy_duplicates_and_merges_served(tmp_path, tiny_model_dir):
    ws = open_ws(tmp_path / "ws", tiny_model_dir, sampler={"temperature": 0, "n": 3})
    prompts = _prompts(ws)
    import datetime as dt

    served = pa.table({
        "response_id": ["r1", "r2"], "prompt_id": ["p1", "p9"], "prompt": [PLAIN[0], "old prompt"],
        "response": ["A served answer.", "服务过的回答"], "model_version": ["m0001", "m0001"],
        "served_at": pa.array([dt.datetime(2024, 5, 1, tzinfo=dt.UTC)] * 2, pa.timestamp("us", tz="UTC")),
        "position": pa.array([0, 1], pa.int32()), "variant": ["A", None],
    })
    served_ref = ws.store.write("served", served).ref
    run = sample(ws, prompts, served_ref)
    cands = ws.store.read(run.outputs["candidates"]).to_pylist()
    sampled = [c for c in cands if c["origin"] == "sampled"]
    assert len(sampled) == 4 and {c["dup_count"] for c in sampled} == {3}  # greedy: 3 identical -> 1
    assert run.report["dropped"] == {"duplicate_response": 8}
    got = {c["candidate_id"]: c for c in cands if c["origin"] == "served"}
    assert set(got) == {"r1", "r2"}
    assert got["r1"]["finish_reason"] == "served" and got["r1"]["position"] == 0 and got["r1"]["variant"] == "A"
    assert got["r2"]["response"] == "服务过的回答" and got["r2"]["served_at"].year == 2024
    assert run.report["served"] == 2


def test_stage_truncate_policy_and_share(tmp_path, tiny_model_dir):
    ws = open_ws(tmp_path / "ws", tiny_model_dir, too_long="truncate", max_prompt_tokens=8,
                 sampler={"n": 1, "temperature": 1.0})
    _prompts(ws)
    run = sample(ws)
    cands = ws.store.read(run.outputs["candidates"])
    assert max(cands.column("n_prompt_tokens").to_pylist()) == 8
    assert run.report["truncated"] == 4
    ids = pa.array([f"id{i}" for i in range(2000)])
    mask = sampling._share_mask(ids, "sampler0", 0.25)
    assert 0.2 < mask.mean() < 0.3
    assert (mask == sampling._share_mask(ids, "sampler0", 0.25)).all()


def test_missing_model_fails_before_any_work(tmp_path):
    ws = open_ws(tmp_path / "ws", tmp_path / "no-such-model")
    _prompts(ws)
    with pytest.raises(sampling.ModelNotFound, match="does not exist"):
        sample(ws)
    assert [n for n in ws.store.list() if n.startswith("shard_")] == []
    assert not ws.store.exists("candidates")
