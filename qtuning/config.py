"""One pydantic config tree for a qtuning run, validated at the edge, round-tripped to YAML.

Imports nothing heavy (no torch), so configs load and validate anywhere.

Every field is documented where it is declared. Cross-field checks name the
YAML path of the offending field and the fix, and all problems are reported at
once (pydantic collects them) before any model or data loads.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUNDLED_MODEL = "smollm2-135m-instruct"
DATA_PRESETS = ("sharegpt", "arc")

SampleRule = Literal["all", "random", "longest", "infobatch", "ppl", "entropy", "qtuning"]
TokenRule = Literal["all", "random", "ppl", "qtuning"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Frozen):
    """Which model is fine-tuned, and how."""

    name: str = Field(
        BUNDLED_MODEL,
        description=f"'{BUNDLED_MODEL}' (bundled, fetched by `qtuning assets`), a local folder, or a hub id.",
    )
    finetune: Literal["full", "lora"] = Field("full", description="Full fine-tuning or LoRA adapters (merged at the end).")
    lora_r: int = Field(16, ge=1, description="LoRA rank (finetune: lora).")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha (finetune: lora).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (finetune: lora).")
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules LoRA adapts; 'all-linear' adapts every linear layer but the head."
    )
    random_init: bool = Field(
        False,
        description="Initialise the architecture randomly instead of loading weights (tests, smoke runs); "
        "the real tokenizer is still used.",
    )
    config_overrides: dict[str, int | float | bool | str] = Field(
        default_factory=dict,
        description="Overrides of the model's transformers config, e.g. {num_hidden_layers: 2} (random_init only).",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.config_overrides and not self.random_init:
            raise ValueError(
                "model.config_overrides is only allowed with model.random_init: true "
                "(overriding the shape of pretrained weights would not load them)"
            )
        return self


class DataConfig(_Frozen):
    """Where the SFT data comes from and how rows become token sequences."""

    source: str = Field(
        "sharegpt",
        description="A bundled preset (sharegpt, arc), a local .jsonl/.json/.parquet file, or a hub dataset id.",
    )
    split: str = Field("train", description="Split to read (hub datasets and parquet folders).")
    format: Literal["auto", "pairs", "messages"] = Field(
        "auto",
        description="'pairs': prompt/response fields; 'messages': a chat list of {role, content}; "
        "'auto': 'messages' if the messages field exists in the first row, else 'pairs'.",
    )
    prompt_field: str = Field("prompt", description="Field holding the user prompt (pairs format).")
    response_field: str = Field("response", description="Field holding the target response (pairs format).")
    system_field: str | None = Field(None, description="Optional field with a system prompt (pairs format).")
    messages_field: str = Field("messages", description="Field holding the chat list (messages format).")
    id_field: str | None = Field(None, description="Field with a stable row id; default: the row's position in the source.")
    max_length: int = Field(1024, ge=8, description="Tokens per sample after the chat template; longer rows are cut.")
    limit: int | None = Field(None, ge=1, description="Use at most this many rows (after a seeded shuffle).")
    seed: int = Field(0, description="Seed of the shuffle applied before `limit`.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A malformed row stops the run with file/row/field ('error') or is skipped and counted."
    )

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str) -> str:
        if v in DATA_PRESETS:
            return v
        p = Path(v).expanduser()
        looks_local = v.startswith((".", "/", "~")) or p.suffix in (".jsonl", ".json", ".parquet")
        if looks_local and not p.exists():
            raise ValueError(
                f"data file {v!r} does not exist; give an existing .jsonl/.json/.parquet path, "
                f"a preset ({', '.join(DATA_PRESETS)}) or a hub dataset id"
            )
        return v


class PruningConfig(_Frozen):
    """What to keep of each selection pool: which samples (stage 1), which of their tokens (stage 2)."""

    sample: SampleRule = Field(
        "qtuning",
        description="Sample rule. qtuning: EU-plane quadrant triage; all: keep every row (full data); random; "
        "longest; infobatch (drop low-loss rows at random, rescale survivors); ppl (highest perplexity); "
        "entropy (highest mean predictive entropy).",
    )
    token: TokenRule = Field(
        "qtuning",
        description="Token rule for rows the sample rule marks for pruning (Q2 for qtuning, every kept row otherwise). "
        "qtuning: drop the highest context-aware PPL scores; ppl: keep the highest-loss tokens; random; all.",
    )
    sample_ratio: float = Field(0.25, gt=0.0, le=1.0, description="r_s: share of each pool's samples kept.")
    token_ratio: float = Field(0.5, gt=0.0, le=1.0, description="r_t: share of a pruned row's response tokens kept.")
    lam: float = Field(0.5, ge=0.0, le=1.0, description="lambda: weight of the neighbours in the context-aware token score.")
    entropy_scope: Literal["response", "all"] = Field(
        "response", description="Positions averaged into sample entropy: response (paper) or every non-pad (official code)."
    )
    token_budget: Literal["per_sample", "batch_global"] = Field(
        "per_sample",
        description="per_sample: each pruned row keeps ceil(r_t*T) response tokens (paper); batch_global: the pool keeps "
        "round(N*r_s*r_t) of its N non-pad tokens (official code).",
    )
    loss_norm: Literal["response", "all_tokens"] = Field(
        "response",
        description="Loss denominator: kept response tokens (default) or all non-pad positions of kept rows (official code).",
    )
    selection_batch_size: int | None = Field(
        None,
        ge=2,
        description="Samples scored and triaged together (the pool). Default: training.micro_batch_size (the paper). "
        "micro_batch_size / sample_ratio trains full micro-batches of kept rows and steadies the quantiles.",
    )
    bisect_iters: int = Field(10, ge=1, description="Maximum bisection iterations for alpha = beta.")
    bisect_tol: float = Field(0.01, gt=0.0, lt=1.0, description="Tolerance on |kept share - sample_ratio|.")
    train_on: Literal["kept_rows", "masked_batch"] = Field(
        "kept_rows",
        description="kept_rows: forward/backward only the kept rows (saves compute); masked_batch: the whole pool "
        "with dropped rows masked out of the loss (the official code; same gradient, no saving).",
    )

    @model_validator(mode="after")
    def _check(self) -> PruningConfig:
        problems = []
        if self.sample == "all" and self.sample_ratio != 1.0:
            problems.append(
                f"pruning.sample_ratio={self.sample_ratio} has no effect with pruning.sample: all; "
                "set pruning.sample_ratio: 1.0 or choose a pruning rule"
            )
        if self.token == "all" and self.token_ratio != 1.0:
            problems.append(
                f"pruning.token_ratio={self.token_ratio} has no effect with pruning.token: all; "
                "set pruning.token_ratio: 1.0 or choose a token rule"
            )
        if self.token_budget == "batch_global" and self.sample != "qtuning":
            problems.append("pruning.token_budget: batch_global is defined for pruning.sample: qtuning only; use per_sample")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_full_data(self) -> bool:
        return self.sample == "all" and self.token == "all"

    @property
    def needs_scores(self) -> bool:
        """True when the rule needs the no-grad scoring forward (random/longest/all do not)."""
        return self.sample in ("qtuning", "ppl", "entropy", "infobatch") or self.token in ("qtuning", "ppl")


class TrainingConfig(_Frozen):
    """The optimisation: steps, schedule, precision, checkpoints."""

    epochs: float = Field(1.0, gt=0.0, description="Passes over the data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    lr: float = Field(2e-5, gt=0.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, description="Rows per forward/backward (and per pool unless pruning.selection_batch_size).")
    grad_accum_steps: int = Field(1, ge=1, description="Pools per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm; null disables.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, fp32 on CPU."
    )
    seed: int = Field(0, description="Seed for initialisation, data order and random selectors.")
    output_dir: str = Field("runs/default", description="Run folder: metrics.jsonl, checkpoints/, final/.")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every N optimizer steps (always at the end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept on disk (oldest deleted).")
    group_by_length: bool = Field(
        False, description="Order pools so rows of similar length meet (less padding); changes which rows share a pool."
    )
    score_chunk_tokens: int = Field(
        2048, ge=16, description="Positions per chunk of the scoring head, bounding its fp32 logits to chunk x vocab."
    )
    log_every_steps: int = Field(1, ge=1, description="Write metrics every N optimizer steps.")
    accelerate_config: str | None = Field(
        None, description="An accelerate config file (DDP/FSDP/DeepSpeed) used by `accelerate launch`."
    )


class ExperimentConfig(_Frozen):
    """A single training run: model, data, pruning, training."""

    name: str = Field("qtuning", description="Run name (MLflow run name, output folder).")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pruning: PruningConfig = PruningConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        problems = []
        pool = self.pool_size
        if self.pruning.sample == "qtuning" and pool < 2:
            problems.append(
                f"quadrant triage needs at least 2 samples per pool, got {pool}; raise training.micro_batch_size "
                "or pruning.selection_batch_size"
            )
        if self.pruning.sample != "all":
            kept = max(1, round(pool * self.pruning.sample_ratio))
            if kept == pool:
                problems.append(
                    f"pool of {pool} samples at pruning.sample_ratio={self.pruning.sample_ratio} keeps every row; "
                    "use a larger pool (pruning.selection_batch_size) or a smaller ratio"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def pool_size(self) -> int:
        return self.pruning.selection_batch_size or self.training.micro_batch_size

    # ---- YAML round trip -------------------------------------------------
    def to_yaml(self) -> str:
        return dump_yaml(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        return load_yaml(cls, path)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A config file failed validation; the message lists every problem with its YAML path."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        extra = f" (got {got!r})" if e["type"] not in ("value_error",) and not isinstance(got, dict) else ""
        lines.append(f"  - {loc}: {msg}{extra}")
    return "\n".join(lines)


def load_yaml(cls: type[BaseModel], path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return validate(cls, raw, str(path))


def validate(cls: type[BaseModel], raw: dict, source: str = "config") -> Any:
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def with_overrides(cfg: BaseModel, overrides: dict[str, Any]) -> Any:
    """A copy of `cfg` with dotted-path overrides applied ({'pruning.sample_ratio': 0.5}), re-validated."""
    raw = cfg.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"override {dotted!r}: {p!r} is not a config section")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"override {dotted!r}: unknown field {leaf!r}")
        node[leaf] = value
    return validate(type(cfg), raw, "overrides " + ", ".join(overrides))


def keep_count(pool: int, ratio: float) -> int:
    """K = max(1, round(b * r_s)): rows a pool keeps."""
    return max(1, round(pool * ratio))

