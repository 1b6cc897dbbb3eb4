"""The embedded default model: built locally and deterministically, no hub access.

`dpoflow demo` and the tests need a real causal LM with a real tokenizer. We train a
byte-level BPE tokenizer with `tokenizers` on a small built-in English / Chinese corpus
(byte-level, so any UTF-8 text round-trips), give it a chat template, and initialise a tiny
Llama-architecture model from a seed. The same seed gives the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>"]

_EN = [
    "The quick brown fox jumps over the lazy dog.",
    "Please explain how a binary search works in simple terms.",
    "A good answer is clear, correct and short.",
    "Thank you for your question, here is a helpful reply.",
    "Write a haiku about the autumn moon over the river.",
    "Python lists are ordered, mutable collections of items.",
    "To reverse a string in Python, use slicing with a step of minus one.",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "Gradient descent updates parameters in the direction that lowers the loss.",
    "I am sorry, but I cannot help with that request.",
    "Drink water, sleep well, and take a short walk every day.",
    "Direct preference optimization trains a policy from pairs of chosen and rejected answers.",
    "What is the difference between a list and a tuple?",
    "Summarize the following paragraph in one sentence.",
    "The weather today is sunny with a light breeze from the west.",
    "Machine learning models learn patterns from data.",
]
_ZH = [
    "今天天气很好，我们去公园散步吧。",
    "请用简单的话解释二分查找是如何工作的。",
    "一个好的回答应该清楚、正确、简洁。",
    "谢谢你的问题，这是一个有帮助的回答。",
    "北京是中国的首都，上海是一个国际化的大城市。",
    "机器学习模型从数据中学习规律。",
    "对不起，我不能帮助你完成这个请求。",
    "多喝水，早点睡觉，每天散步半小时。",
    "直接偏好优化使用被选择和被拒绝的回答对来训练模型。",
    "请把下面这段话总结成一句话。",
    "列表和元组有什么区别？",
    "中文和英文可以混合在同一个句子里，比如 Python 很好用。",
    "秋天的月亮照在河面上，非常安静。",
    "梯度下降沿着让损失变小的方向更新参数。",
]


def corpus() -> list[str]:
    """The built-in training text for the tokenizer (mixed English / Chinese)."""
    return _EN + _ZH + [f"{a} {b}" for a, b in zip(_EN, _ZH, strict=False)]


def build_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on the built-in corpus and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 128,
    max_position: int = 512,
) -> Path:
    """Build tokenizer + tiny LlamaForCausalLM into `out_dir` (safetensors); return the path.

    Deterministic: the same arguments give byte-identical weights.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "dpoflow_model.json").write_text(json.dumps({"builder": "dpoflow.tasks.tiny_model", "seed": seed}))
    return out


def warm_up(model_dir: str | os.PathLike[str], examples: list[tuple[str, str]], *, steps: int = 150,
            batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Teach a built model to answer: a short supervised fine-tuning on (prompt, answer) pairs
    in the chat template, loss on the answer tokens (and the end token) only. Deterministic
    (seeded order, one CPU thread), seconds on CPU for the tiny model. Saves in place; returns
    the first and last loss."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    rows = []
    for prompt, answer in examples:
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        p_ids = tok(head, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    torch.set_num_threads(1)  # the same sums in the same order: byte-identical weights
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    try:
        model.train()
        order: list[int] = []
        for _ in range(steps):
            if len(order) < batch_size:
                order += rng.sample(range(len(rows)), len(rows))
            batch, order = [rows[i] for i in order[:batch_size]], order[batch_size:]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id)
            labels = torch.full((len(batch), width), -100)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (x, y) in enumerate(batch):
                ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(state)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return {"first_loss": losses[0], "last_loss": losses[-1]} if losses else {}


def build_demo_model(out_dir: str | os.PathLike[str], *, seed: int = 0, steps: int = 150) -> Path:
    """The demo's production model: the tiny model (a little wider) taught the demo corpus
    (`dpoflow.tasks.demo_data.warmup_examples`) so it answers with words, not newlines and
    replacement characters; its answers are mostly terse, which the demo's nights improve."""
    from dpoflow.tasks.demo_data import warmup_examples

    out = build_tiny_model(out_dir, seed=seed, hidden_size=128, intermediate_size=256, layers=2, heads=4)
    stats = warm_up(out, warmup_examples(), steps=steps, seed=seed)
    meta = json.loads((out / "dpoflow_model.json").read_text())
    meta.update({"warm_up": "demo corpus", "steps": steps, **{k: round(v, 4) for k, v in stats.items()}})
    (out / "dpoflow_model.json").write_text(json.dumps(meta))
    return out


def build_tiny_classifier(out_dir: str | os.PathLike[str], *, seed: int = 0, num_labels: int = 1) -> Path:
    """A tiny LlamaForSequenceClassification (reward model shape) with the same tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
