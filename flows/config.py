"""The pipeline config: one YAML file, validated with pydantic, overridable per run.

Precedence (last wins): defaults < ``dpoflow.yaml`` < ``DPOFLOW__SECTION__KEY=value``
environment variables < ``--set section.key=value`` overrides. Unknown keys are errors that
name the key and, for the YAML file, its line. Secrets (database URLs with passwords, S3
keys) are read from the environment by name (``*_env`` fields) or from Prefect Secret blocks
by name (``url_secret``), so the config itself, ``config show``, logs and dataset metadata
never hold them.

Each stage owns its section's model (in its ``tasks`` module); this file only composes them.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, defaults are documented."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    root: str | None = Field(None, description="Store root: a folder or s3://bucket/prefix (default: <workspace>/store)")
    endpoint_url_env: str = Field("AWS_ENDPOINT_URL", description="env var with the S3 endpoint (MinIO, moto...)")
    region: str | None = Field(None, description="S3 region")
    allow_http: bool = Field(False, description="allow plain-HTTP S3 endpoints (local MinIO)")

    def options(self) -> dict[str, str]:
        """S3 options for the store; keys come from AWS_* environment variables only."""
        if not (self.root or "").startswith("s3://"):
            return {}
        opts = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
                if os.environ.get(k)}
        if os.environ.get(self.endpoint_url_env):
            opts["AWS_ENDPOINT_URL"] = os.environ[self.endpoint_url_env]
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts["AWS_REGION"] = region
        if self.allow_http:
            opts["AWS_ALLOW_HTTP"] = "true"
        return opts


class ImportConfig(Section):
    on_bad_rows: Literal["quarantine", "fail"] = Field(
        "quarantine", description="quarantine | fail: what to do with rows that break the contract")


class InboxConfig(Section):
    """Files the nightly run imports before sampling (each imported only when it changed)."""

    prompts: str | None = Field(None, description="prompts file or folder (Parquet / JSONL / CSV)")
    served: str | None = Field(None, description="served responses file or folder (become candidates, origin=served)")
    annotations: str | None = Field(None, description="human annotations (JSONL / CSV / Label Studio JSON)")
    pairs: str | None = Field(None, description="ready-made preference pairs to add (source=imported)")
    feedback_events: str | None = Field(None, description="behaviour events file or folder (checked by the ingest "
                                        "rules: event types, timestamp window, orphans, exactly-once, abuse)")


class NightlyConfig(Section):
    inbox: InboxConfig = Field(default_factory=InboxConfig, description="input files imported at the start of a run")
    sample: bool = Field(True, description="sample new candidates from models@production")
    train: bool = Field(True, description="train, evaluate and (if the gate passes) promote")
    stage_timeout_s: float = Field(6 * 3600, gt=0, description="timeout of each data stage flow")
    train_timeout_s: float = Field(24 * 3600, gt=0, description="timeout of the train flow")
    retries: int = Field(2, ge=0, description="retries of a stage after a transient error (I/O, CUDA OOM)")
    retry_delay_s: float = Field(30, ge=0, description="first retry delay; doubles on each retry")
    report_delay_s: float = Field(10, ge=0, description="longest a stage's report artifacts wait before they are "
                                  "posted to Prefect (short stages are posted in batches, e.g. while training runs)")
    cron: str = Field("0 2 * * *", description="schedule of the nightly deployment (cron; `dpoflow serve` and "
                      "`dpoflow deploy apply` read it)")
    timezone: str = Field("UTC", description="IANA timezone of `cron`, e.g. Europe/Berlin")


def _stage_models() -> dict[str, type[BaseModel]]:
    """Stage sections from the stage registry, imported only when the config is built."""
    from dpoflow.flows.registry import config_sections

    return config_sections()


def _build_model() -> type[BaseModel]:
    from pydantic import create_model

    from dpoflow.flows.ray_runner import RayConfig
    from dpoflow.tasks.annotations import AnnotationsConfig as annotations_model  # aggregation of annotators

    fields: dict[str, Any] = {
        "storage": (StorageConfig, Field(default_factory=StorageConfig)),
        "import_": (ImportConfig, Field(default_factory=ImportConfig, alias="import")),
        "nightly": (NightlyConfig, Field(default_factory=NightlyConfig)),
        "annotations": (annotations_model, Field(default_factory=annotations_model)),
        "ray": (RayConfig, Field(default_factory=RayConfig)),  # the Ray cluster of `runner: ray`
    }
    for name, model in _stage_models().items():
        fields[name] = (model, Field(default_factory=model))
    return create_model("PipelineConfig", __config__=ConfigDict(extra="forbid", populate_by_name=True), **fields)


_MODEL: type[BaseModel] | None = None


def pipeline_model() -> type[BaseModel]:
    global _MODEL
    if _MODEL is None:
        _MODEL = _build_model()
    return _MODEL


class ConfigError(ValueError):
    pass


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map every key path in a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                lines[p] = k.start_mark.line + 1
                walk(v, p)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | dict | None) -> dict[str, Any]:
    """``["train.beta=0.2", "sample.n=4"]`` -> {"train.beta": 0.2, "sample.n": 4} (YAML-typed)."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = _yaml_value(v, f"override --set {item}")
    return out


def _yaml_value(text: str, where: str) -> Any:
    """A value as YAML types it (0.2 -> float, [1, 2] -> list); broken YAML is a config error."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError(f"{where}: not a valid value ({problem})") from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | dict | None = None,
                env: dict[str, str] | None = None):
    """Read, merge and validate the config; errors name the key and (for the file) its line."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    text = ""
    origin: dict[tuple[str, ...], str] = {}  # key path -> the override or variable that set it
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for k, v in env.items():
        if k.startswith("DPOFLOW__"):
            key = ".".join(p.lower() for p in k[len("DPOFLOW__"):].split("__"))
            _set_path(data, key, _yaml_value(v, f"environment variable {k}"))
            origin[tuple(key.split("."))] = f"environment variable {k}"
    for k, v in parse_overrides(overrides).items():
        _set_path(data, k, v)
        origin[tuple(k.replace("import.", "import_.", 1).split("."))] = f"override --set {k}"
        origin[tuple(k.split("."))] = f"override --set {k}"
    try:
        return pipeline_model().model_validate(data)
    except ValidationError as exc:
        lines = _line_index(text)
        msgs = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            src = next((origin[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in origin), None)
            where = f"{src}: " if src else f"{path}:{lines[loc]}: " if loc in lines and path else ""
            key = ".".join(loc)
            problem = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msgs.append(f"{src}: {problem}" if src else f"{where}{key}: {problem}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(msgs)) from None


def dump_config(config: BaseModel) -> dict[str, Any]:
    """The effective config as plain data (secrets are never in it: they are env var names)."""
    return config.model_dump(mode="json", by_alias=True)


def _item_model(ann: Any) -> type[BaseModel] | None:
    """The section model inside ``list[Model]`` / ``dict[str, Model]`` annotations, if any."""
    for arg in typing.get_args(ann):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def reference_markdown() -> str:
    """Every config key with its type, default and description, as markdown tables per section.

    The README's config reference is this output; a test keeps the two in agreement.
    """
    import json as _json

    def type_name(ann: Any) -> str:
        text = str(ann) if typing.get_args(ann) else (getattr(ann, "__name__", None) or str(ann))
        return text.replace("typing.", "").replace("NoneType", "None").replace("|", "\\|")

    def rows(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, f in model.model_fields.items():
            key = f"{prefix}.{f.alias or name}" if prefix else (f.alias or name)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out += rows(ann, key)
                continue
            item = _item_model(ann)
            default = f.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            elif isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump(mode="json", exclude_defaults=True) for d in default]
            dflt = _json.dumps(default, default=str, ensure_ascii=False)
            desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{key}` | `{type_name(ann)}` | `{dflt}` | {desc} |".replace("`|", "` |"))
            if item is not None:  # list / dict of sections: document the fields of one item
                out += rows(item, key + ("[]" if typing.get_origin(ann) is list else ".<name>"))
        return out

    model = pipeline_model()
    parts = []
    for name, f in model.model_fields.items():
        section = f.alias or name
        parts += [f"#### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|",
                  *rows(f.annotation, section), ""]
    return "\n".join(parts)


README_BEGIN = "<!-- config-reference:begin (generated by `python -m dpoflow.flows.config`) -->"
README_END = "<!-- config-reference:end -->"


def update_readme(path: str | os.PathLike[str] = "README.md") -> bool:
    """Rewrite the README's config reference from the models; True when it changed."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    new = text[:start] + "\n\n" + reference_markdown() + "\n" + text[end:]
    if new != text:
        p.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    print("README.md updated" if update_readme() else "README.md already up to date")
