"""The `train` section of the pipeline config: one pydantic model for the whole DPO run.

Public API (stable; other modules and the `train` / `ref_logps` stages build on it):

    TrainConfig                 the section (``ws.config.train``); every field documented.
    TrainConfig.loss_names      the selected loss names as a list (``loss`` may be a str or list).
    TrainConfig.loss_weights_   the weight of each selected loss (defaults to 1.0 each).
    TrainConfig.needs_reference whether any selected loss needs reference log-probs.
    TrainConfig.global_batch    pairs per optimizer step (batch_size x grad_accum x world size).
    TrainConfig.tokenization_key()  the fields that decide token ids (a stored `ref_logps`
                                version is valid for a training run only when this matches).

Loss parameters (``label_smoothing``, ``simpo_gamma``, ``rpo_alpha``) default to ``None``
meaning "not given". Giving one that none of the selected losses uses is a validation error,
never a silently ignored knob (see :mod:`dpoflow.tasks.training.losses` for which loss uses what).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from dpoflow.tasks.contract import Section
from dpoflow.tasks.training.evaluation import EvalConfig
from dpoflow.tasks.training.kubeflow import KubeflowConfig
from dpoflow.tasks.training.promotion import PromoteConfig

Beta = Annotated[float, Field(ge=0, lt=1)]


class TrainConfig(Section):
    # No float field may be inf or NaN: `lr: .inf` used to train to all non-finite weights.
    model_config = ConfigDict(allow_inf_nan=False)

    # --- model ---------------------------------------------------------------------------
    model: str | None = Field(
        None, description="policy to start from: a local model folder, a registry model version, "
        "or None for the current production model (the flow resolves it)")
    ref_model: str | None = Field(
        None, description="reference model for ref_logps; None = the same model the policy starts from")

    # --- loss ----------------------------------------------------------------------------
    loss: str | list[str] = Field(
        "sigmoid", description="loss name or list of names: sigmoid (DPO; with label_smoothing = "
        "conservative DPO), robust, ipo, hinge, nca_pair, sppo_hard, apo_zero, apo_down, bco_pair, "
        "sigmoid_norm, simpo")
    loss_weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, description="weight of each loss in `loss` (same length, each >= 0, not all 0); None = 1.0 each")
    beta: float = Field(0.1, gt=0, description="β: strength of the implicit KL constraint / reward scale")
    label_smoothing: float | None = Field(
        None, ge=0, lt=0.5, description="ε, assumed label-noise rate (sigmoid = cDPO, robust, simpo); "
        "None = not used")
    simpo_gamma: float | None = Field(None, description="γ, SimPO target reward margin (simpo only)")
    rpo_alpha: float | None = Field(
        None, ge=0, description="α of the RPO SFT term: + α·NLL per chosen token; None = off")

    # --- tokenization --------------------------------------------------------------------
    max_length: int = Field(1024, ge=2, description="max tokens of prompt + completion (each side)")
    max_prompt_length: int | None = Field(
        None, ge=1, description="max prompt tokens kept when a pair is too long; None = max_length // 2")
    truncation_side: Literal["left", "right"] = Field(
        "left", description="which end of a too-long prompt is cut: left keeps its end (the last turn), "
        "right keeps its start")
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto", description="prompt formatting: auto = chat template for prompt_messages, and for plain "
        "prompts when the tokenizer has one; always = require it; never = raw prompt text")

    # --- optimisation --------------------------------------------------------------------
    lr: float = Field(5e-6, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    adam_betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW (β1, β2), each in [0, 1)")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW ε")
    batch_size: int = Field(8, ge=1, description="pairs per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    epochs: float = Field(1.0, gt=0, description="passes over dpo_train (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; None = derived from epochs")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="share of steps with linear LR warm-up")
    warmup_steps: int | None = Field(None, ge=0, description="warm-up steps (overrides warmup_ratio)")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR decay after warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final LR as a share of lr (cosine / linear)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm; None = no clipping")
    seed: int = Field(0, description="seed for data order and initialisation of new weights")
    data_order: Literal["shuffled", "sequential"] = Field(
        "shuffled", description="shuffled = a seeded permutation per epoch (length-grouped when "
        "length_grouping); sequential = dpo_train's row order, batch after batch (as TRL without "
        "shuffling), e.g. to compare losses step by step with another trainer")
    length_grouping: bool = Field(True, description="group pairs of similar length into batches (less padding)")
    group_size_mult: int = Field(16, ge=1, description="length grouping window, in global batches")
    packing: bool = Field(
        True, description="padding-free micro-batches: sequences packed into rows with position_ids per "
        "sequence and attention kept inside each (block-diagonal mask; flash-attention varlen on CUDA); "
        "the same log-probs as padded rows, less padding")
    packing_row_factor: float = Field(
        2.0, ge=1, description="packed row length as a multiple of the micro-batch's longest sequence: "
        "longer rows leave less padding but, without flash-attention, cost attention over the whole row "
        "(2 measured best on CPU)")

    # --- precision / memory --------------------------------------------------------------
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast on CUDA with bf16 support, fp32 on CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (saves memory)")
    logit_chunk: int = Field(1024, ge=1, description="completion tokens per chunk in the lm-head log-softmax")
    lora: bool = Field(False, description="train LoRA adapters (peft) instead of all weights")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA α")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    lora_target_modules: list[str] | str = Field(
        "all-linear", description="module names to adapt, or 'all-linear'")

    ref_logps_in_trainer: bool = Field(
        True, description="when the reference is the starting policy and training runs in one process, "
        "compute the training set's reference log-probs in the training process (one model load, no "
        "ref_logps stage for dpo_train); false = store them with the ref_logps stage first, so runs that "
        "differ only in β / loss / lr reuse them")

    # --- processes -----------------------------------------------------------------------
    devices: int = Field(1, ge=1, description="processes per node (GPUs, or CPU processes on gloo)")
    in_process: bool = Field(
        True, description="one process on this machine (devices x nnodes = 1, launcher local): train inside "
        "the flow's own process (one interpreter, one model load: less start-up time and memory); "
        "launch_timeout_s then stops training at the next step boundary, with a checkpoint, and a killed flow "
        "process takes training with it. false = one child worker process in its own session (isolated, "
        "killed hard on timeout or cancellation) at the cost of a second interpreter with torch. Several "
        "processes always run under torchrun")
    nnodes: int = Field(1, ge=1, description="nodes; >1 needs master_addr and node_rank on each node")
    node_rank: int = Field(0, ge=0, description="this node's rank (multi-node)")
    master_addr: str = Field("127.0.0.1", description="rendezvous host (multi-node)")
    master_port: int | None = Field(None, description="rendezvous port; None = a free local port")
    launcher: Literal["local", "kubeflow"] = Field(
        "local", description="local: the worker / torchrun on this machine; kubeflow: a Kubeflow Trainer "
        "TrainJob runs torchrun on train.nnodes nodes (see train.kubeflow)")
    kubeflow: KubeflowConfig = Field(default_factory=KubeflowConfig,
                                     description="the TrainJob of launcher: kubeflow (image, GPUs, volume)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes: ddp = a full model copy per process; fsdp = FSDP2 "
        "(fully_shard per transformer block, then the root): weights, gradients and AdamW state sharded "
        "across processes, for models that do not fit one GPU; checkpoints and the final model are "
        "gathered to full tensors on rank 0")
    launch_timeout_s: float = Field(24 * 3600, gt=0, description="hard limit for a torchrun launch")
    dist_timeout_s: float = Field(1800, gt=0, description="collective timeout inside the process group")

    # --- checkpoints / robustness --------------------------------------------------------
    checkpoint_every: int = Field(200, ge=0, description="optimizer steps between checkpoints; 0 = none")
    keep_checkpoints: int = Field(2, ge=1, description="most recent checkpoints kept")
    max_nan_steps: int = Field(10, ge=0, description="non-finite losses skipped before the run aborts")
    deterministic: bool = Field(False, description="torch deterministic algorithms (slower; exact resume on GPU)")
    log_every: int = Field(10, ge=1, description="optimizer steps between log lines")
    report_to: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="also log the training metrics to TensorBoard (event files under "
        "<workspace>/artifacts/train/tensorboard/<run>; needs `tensorboard`) or MLflow (MLFLOW_TRACKING_URI; needs "
        "`mlflow`), as they are written, every few seconds; none = off")
    max_truncated_share: float = Field(
        0.2, ge=0, le=1, description="share of pairs that tokenization may truncate or drop before the run "
        "warns (in the log, the train report and the CLI output)")

    # --- evaluation (the eval helper may extend) -----------------------------------------
    eval_batch_size: int = Field(16, ge=1, description="pairs per batch when scoring dpo_eval")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation (tasks.training.evaluation)")
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="promotion gate (tasks.training.promotion)")

    @model_validator(mode="after")
    def _check_losses(self) -> TrainConfig:
        from dpoflow.tasks.training.loss_names import validate_loss_params

        validate_loss_params(self.loss_names, self.loss_weights, label_smoothing=self.label_smoothing,
                             simpo_gamma=self.simpo_gamma, rpo_alpha=self.rpo_alpha)
        if self.loss_weights is not None and not any(w > 0 for w in self.loss_weights):
            raise ValueError(f"loss_weights {self.loss_weights} are all 0: nothing would be trained")
        if self.prompt_limit >= self.max_length:  # only when given: the default max_length // 2 fits
            raise ValueError(f"max_prompt_length {self.prompt_limit} must be smaller than max_length "
                             f"{self.max_length}, to leave room for the completion (leave it unset for "
                             "max_length // 2)")
        return self

    @property
    def prompt_limit(self) -> int:
        """max_prompt_length, or half of max_length when not given."""
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2

    def check_pairs(self, n_pairs: int, what: str = "dpo_train") -> None:
        """Fail before any work when the data cannot fill one optimizer step (TrainingError)."""
        from dpoflow.tasks.training.results import TrainingError

        if n_pairs < self.global_batch:
            raise TrainingError(f"{what} has {n_pairs} pairs, fewer than one global batch of {self.global_batch} "
                             f"(batch_size {self.batch_size} x grad_accum {self.grad_accum} x {self.world_size} "
                             "processes); lower train.batch_size or train.grad_accum")

    @property
    def loss_names(self) -> list[str]:
        return [self.loss] if isinstance(self.loss, str) else list(self.loss)

    @property
    def loss_weights_(self) -> list[float]:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_names)

    @property
    def needs_reference(self) -> bool:
        from dpoflow.tasks.training.loss_names import REFERENCE_FREE

        return any(n not in REFERENCE_FREE for n in self.loss_names)

    @property
    def world_size(self) -> int:
        return self.devices * self.nnodes

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def tokenization_key(self) -> dict:
        """The settings that decide token ids; stored ref log-probs are valid only for the same."""
        return {"max_length": self.max_length, "max_prompt_length": self.prompt_limit,
                "truncation_side": self.truncation_side, "chat_template": self.chat_template}
