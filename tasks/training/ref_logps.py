"""The `ref_logps` stage: the reference model's summed completion log-probs, stored once.

Public API:

    ModelRef(ref, version, local)          a resolved model: registry version or local folder.
    resolve_model(registry, ref) -> ModelRef   cheap: never loads (or downloads) the model.
    model_path(registry, model) -> Path        the local folder (downloads a remote registry model).
    ref_key_config(cfg) -> dict            the settings the stored values depend on.
    make_ref_logps_stage(cfg, model) -> stage fn   reads role ``pairs``, writes ``ref_logps``.

The shell (``dpoflow.flows.train_steps.ref_logps_for``) runs the stage with a content key of pairs
version + reference model version + tokenization + precision, so a rerun or a β sweep reuses
the stored rows and the reference model is not even loaded.

Why: DPO needs log π_ref(y|x) for every pair, every epoch. Computing it once per (pairs
version, reference version) under ``torch.inference_mode`` means training holds only the
policy in memory, and a hyper-parameter sweep costs no extra reference forwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpoflow.tasks.contract import StageContext, StageResult

if TYPE_CHECKING:
    from dpoflow.storage.registry import ModelRegistry

MODEL_PREFIX = "models@"


@dataclass(frozen=True)
class ModelRef:
    """A model named by the config: a registry version, or a local folder with a fingerprint."""

    ref: str  # as given: "models@production", "m0003-..." or a folder
    version: str  # registry version, or "local:<folder name>-<hash>"
    local: Path | None = None  # set for folder models (not in the registry)

    @property
    def lineage(self) -> str:
        """How lineage names it: ``models@<version>`` for registry models, the folder otherwise."""
        return f"{MODEL_PREFIX}{self.version}" if self.local is None else f"path:{self.local}"


def folder_fingerprint(path: Path) -> str:
    """Hash of the weight / config / tokenizer files (names, sizes, first MiB): a changed folder
    gives a new version, so stored log-probs of the old weights are not reused by mistake."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".model"))
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"{path} holds no .safetensors weights")
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def resolve_model(registry: ModelRegistry, ref: str | None) -> ModelRef:
    """Resolve a model ref without loading it: ``models@tag``, a registry version, or a folder.

    ``None`` means the production model."""
    ref = ref or f"{MODEL_PREFIX}production"
    folder = Path(ref).expanduser()
    if not ref.startswith(MODEL_PREFIX) and folder.is_dir():
        folder = folder.resolve()
        return ModelRef(ref, f"local:{folder.name}-{folder_fingerprint(folder)}", folder)
    try:
        version = registry.version_of(ref)
    except Exception as exc:
        raise ValueError(f"model {ref!r} is neither a local model folder nor a registered model: {exc}") from exc
    return ModelRef(ref, version)


def model_path(registry: ModelRegistry, model: ModelRef) -> Path:
    """The model's local folder; a registry model is fetched to the cache when the store is remote."""
    path = model.local if model.local is not None else registry.local_path(model.version)
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"model {model.ref} ({model.version}) has no files at {path}")
    return Path(path)


def ref_key_config(cfg: Any) -> dict[str, Any]:
    """What stored reference log-probs depend on besides data and model: tokenization and
    numeric precision (β, loss, lr... are left out on purpose: a sweep reuses the rows)."""
    return {"tokenization": cfg.tokenization_key(), "precision": cfg.precision}


def make_ref_logps_stage(cfg: Any, model: ModelRef) -> Callable[[StageContext], StageResult]:
    """The stage function (a closure over the train config and the resolved reference)."""

    def ref_logps_stage(ctx: StageContext) -> StageResult:
        from dpoflow.tasks.generation import pick_device
        from dpoflow.tasks.training.logprobs import compute_ref_logps, load_causal_lm, ref_logps_table
        from dpoflow.tasks.training.tokenization import tokenize_pairs

        table = ctx.read("pairs")
        path = model_path(ctx.registry, model)
        device = pick_device()
        ctx.logger.info("ref_logps: loading reference %s from %s on %s", model.version, path, device)
        ref_model, tokenizer = load_causal_lm(path, device=device)
        tokenized = tokenize_pairs(table, tokenizer, cfg)
        ref = compute_ref_logps(ref_model, tokenized, batch_size=cfg.eval_batch_size, device=device,
                                chunk=cfg.logit_chunk, precision=cfg.precision)
        out = ref_logps_table(tokenized, ref, model.version)
        stats = tokenized.stats.as_dict()
        report = {"rows_in": table.num_rows, "rows_out": out.num_rows, "dropped": stats["dropped"],
                  "prompt_truncated": stats["n_prompt_truncated"],
                  "completion_truncated": stats["n_completion_truncated"], "ref_model": model.version}
        meta = {"ref_model_version": model.version, "ref_model": model.lineage,
                "tokenization": cfg.tokenization_key(), "tokenize_stats": json.loads(json.dumps(stats))}
        return StageResult(outputs={"ref_logps": out}, report=report, metadata={"ref_logps": meta})

    return ref_logps_stage

