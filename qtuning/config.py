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

from qtuning.rules import SAMPLE_RULES, TOKEN_RULES, describe
from qtuning.triage import keep_count

BUNDLED_MODEL = "smollm2-135m-instruct"
SCORE_CHUNK_TOKENS = 512  # positions per chunk of the LM head (scoring, loss): its fp32 logits are chunk x vocabulary
PACK_TOKENS = 512  # target tokens per packed lane (training.pack_tokens)
DATA_PRESETS = ("sharegpt", "arc")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # names that become parts of folder names: no '/', no leading '.'

TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "clearml", "dvclive")  # training.log_with: accelerate's names
DATA_FORMATS = ("auto", "pairs", "messages", "sharegpt", "alpaca", "prompt_completion", "text")  # data.format

# The rule names come from the registry, the only list of them (qtuning.rules; no torch at import).
SampleRule = Literal[tuple(SAMPLE_RULES)]  # type: ignore[valid-type]
TokenRule = Literal[tuple(TOKEN_RULES)]  # type: ignore[valid-type]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)  # inf/nan: refused


class _YamlFile(_Frozen):
    """A top-level config: saved to and loaded from YAML exactly."""

    def to_yaml(self) -> str:
        return dump_yaml(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def load(cls, path: str | Path):
        return load_yaml(cls, path)


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
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template (a string containing '{%' or '{{', or the path of a file holding one) that "
        "replaces the tokenizer's: for base models without one. Chat-format rows are rendered with it and the "
        "fine-tuned model is saved with it. Plain-text formats (text, string prompt/completion) need none.",
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa",
        description="Attention kernels: sdpa (torch's, any device), flash_attention_2 (needs the flash-attn package, a "
        "GPU and bf16/fp16; packed rows then cost no attention across sequences), eager (reference, slowest).",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        problems = []
        if self.config_overrides and not self.random_init:
            problems.append(
                "model.config_overrides is only allowed with model.random_init: true "
                "(overriding the shape of pretrained weights would not load them)"
            )
        t = self.chat_template
        if t is not None and not is_template_text(t) and not Path(t).expanduser().is_file():
            problems.append(
                f"model.chat_template: {t!r} is neither a Jinja template (no '{{%' or '{{{{') nor an existing file; "
                "give the template itself or the path of a file holding it"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def is_template_text(value: str) -> bool:
    """A chat_template value that is the template itself rather than a file path."""
    return "{%" in value or "{{" in value


class DataConfig(_Frozen):
    """Where the SFT data comes from and how rows become token sequences."""

    source: str = Field(
        "sharegpt",
        description="A bundled preset (sharegpt, arc), a local .jsonl/.json/.parquet file, or a hub dataset id.",
    )
    split: str = Field("train", description="Split to read (hub datasets and parquet folders).")
    format: Literal[DATA_FORMATS] = Field(  # type: ignore[valid-type]
        "auto",
        description="How a row reads. 'pairs': prompt/response fields (names below); 'messages': a chat list of "
        "{role, content}; 'sharegpt': a 'conversations' list of {from, value} (human/gpt/system, or user/assistant); "
        "'alpaca': instruction, input, output, optional system and history ([user, assistant] pairs before the "
        "last turn); 'prompt_completion': TRL's prompt and completion, both strings (plain text, no chat template) "
        "or both message lists (loss on the completion's assistant turns); 'text': plain text, every token carries "
        "loss. 'auto': recognised from the first row's fields (in the order messages, sharegpt, alpaca, "
        "prompt_completion, pairs, text) and reported. Chat formats label every assistant turn.",
    )
    prompt_field: str = Field("prompt", description="Field holding the user prompt (pairs and prompt_completion formats).")
    response_field: str = Field("response", description="Field holding the target response (pairs format).")
    system_field: str | None = Field(None, description="Optional field with a system prompt (pairs format).")
    messages_field: str = Field("messages", description="Field holding the chat list (messages format).")
    conversations_field: str = Field("conversations", description="Field holding the {from, value} list (sharegpt format).")
    text_field: str = Field("text", description="Field holding the text (text format).")
    train_on_prompt: bool = Field(
        False,
        description="Loss on every token (system, prompt, template markup) instead of the responses only. Off: "
        "the paper's SFT, where Q-Tuning's sample and token scores are over response tokens.",
    )
    first_turn_only: bool = Field(
        False,
        description="Keep each conversation up to its first trained assistant turn (the first exchange) instead of "
        "every turn up to max_length; the sharegpt preset before whole conversations were kept.",
    )
    id_field: str | None = Field(None, description="Field with a stable row id; default: the row's position in the source.")
    max_length: int = Field(1024, ge=8, description="Tokens per sample after the chat template; longer rows are cut.")
    limit: int | None = Field(None, ge=1, description="Use at most this many rows (after a seeded shuffle).")
    seed: int = Field(0, description="Seed of the shuffle applied before `limit`.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A malformed row stops the run with file/row/field ('error') or is skipped and counted."
    )
    subset: str | None = Field(
        None,
        description="A file of sample ids, one per line: train on those rows of the tokenized set only. A static arm's "
        "prune stage writes it (the rows its triage keeps); the data set itself is prepared once, for every arm.",
    )
    eval_rows: int = Field(
        0,
        ge=0,
        description="Rows held out of training to measure the held-out loss (training.eval_every_steps, summary.json, "
        "the comparison's heldout_loss). Taken from the end of the seeded shuffle (data.seed) of the source, so they "
        "never overlap the `limit` training rows, do not depend on `limit`, and are the same rows for every arm. "
        "With eval_source: at most this many rows of that file (a seeded draw; 0: all of them). 0 without "
        "eval_source: no held-out split.",
    )
    eval_source: str | None = Field(
        None,
        description="A separate local file (.jsonl/.json/.parquet) of held-out rows, read with this section's format "
        "and field names, instead of rows held out of `source`. Part of the data fingerprint (by content).",
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

    @property
    def has_heldout(self) -> bool:
        """True when a held-out split is configured (data.eval_rows or data.eval_source)."""
        return self.eval_rows > 0 or self.eval_source is not None

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        problems = []
        if self.format == "text" and self.train_on_prompt:
            problems.append("data.train_on_prompt has no effect with data.format: text (every token carries loss); remove it")
        if self.format == "text" and self.first_turn_only:
            problems.append("data.first_turn_only has no effect with data.format: text (a text has no turns); remove it")
        if self.eval_source is not None and not Path(self.eval_source).expanduser().is_file():
            problems.append(
                f"data.eval_source: {self.eval_source!r} is not an existing file; give a local .jsonl/.json/.parquet "
                "file of held-out rows, or hold rows out of data.source with data.eval_rows"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PruningConfig(_Frozen):
    """What to keep of each selection pool: which samples (stage 1), which of their tokens (stage 2)."""

    sample: SampleRule = Field(
        "qtuning", description="Sample rule (stage 1), from the registry qtuning.rules. " + describe(SAMPLE_RULES) + "."
    )
    token: TokenRule = Field(
        "qtuning",
        description="Token rule (stage 2) for rows the sample rule marks for pruning (Q2 for qtuning, every kept row "
        "otherwise), from the registry qtuning.rules. " + describe(TOKEN_RULES) + ".",
    )
    sample_ratio: float = Field(0.25, gt=0.0, le=1.0, description="r_s: share of each pool's samples kept.")
    token_ratio: float = Field(0.5, gt=0.0, le=1.0, description="r_t: share of a pruned row's response tokens kept.")
    lam: float = Field(0.5, ge=0.0, le=1.0, description="lambda: weight of the neighbours in the context-aware token score.")
    anneal: float = Field(0.125, ge=0.0, lt=1.0, description="sample: infobatch: the share of the last optimizer steps "
                          "that train every row (InfoBatch's annealing phase; 0.125 in its code). Other rules ignore it.")
    entropy_scope: Literal["response", "all"] = Field(
        "response", description="Positions averaged into sample entropy: response (paper) or every non-pad (official code)."
    )
    token_budget: Literal["per_sample", "batch_global"] = Field(
        "per_sample",
        description="per_sample: each pruned row keeps ceil(r_t*T) response tokens (paper); batch_global: the pool keeps "
        "round(N*r_s*r_t) of its N non-pad tokens (official code), by one top-k over the pool's candidate tokens; "
        "any sample rule. At token_ratio 1.0 no token is pruned under either.",
    )
    budget: Literal["own", "equal_tokens"] = Field(
        "own",
        description="own: each rule spends r_s and r_t its own way (baselines token-prune every kept row, Q-Tuning "
        "only Q2 rows and keeps Q4 whole, so at the same ratios they train different token counts); equal_tokens: "
        "every pool trains as many loss tokens as Q-Tuning (rules qtuning/qtuning, same r_s, r_t, lam, "
        "token_budget) would train on it, the token rule dropping the surplus of the kept rows by one top-k over "
        "the pool (fewer only when the kept rows hold fewer). Needs the scoring forward. The comparison table "
        "names the budget of each arm.",
    )
    on_nonfinite: Literal["error", "exclude"] = Field(
        "error",
        description="A sample whose PPL or Ent is NaN or infinite: error stops the run naming the sample ids; exclude "
        "leaves it out of its pool's triage (never trains) and counts it in prune/nonfinite.",
    )
    loss_norm: Literal["response", "all_tokens"] = Field(
        "response",
        description="Loss denominator: kept response tokens (default) or all non-pad positions of kept rows less "
        "their pruned response tokens (official code).",
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
        if self.budget == "equal_tokens" and self.token == "all":
            problems.append(
                "pruning.budget: equal_tokens meets Q-Tuning's loss-token count by token pruning, which pruning.token: "
                "all does not do; choose a token rule (e.g. random) or set pruning.budget: own"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_full_data(self) -> bool:
        return self.sample == "all" and self.token == "all"

    @property
    def needs_scores(self) -> bool:
        """True when either rule needs the no-grad scoring forward (the registry says which do), or the equal_tokens
        budget, which triages every pool on the EU plane to know Q-Tuning's count."""
        return SAMPLE_RULES[self.sample].needs_scores or TOKEN_RULES[self.token].needs_scores or self.budget == "equal_tokens"


class TrainingConfig(_Frozen):
    """The optimisation: steps, schedule, precision, checkpoints."""

    epochs: float = Field(1.0, gt=0.0, le=1000.0, description="Passes over the data (fractions allowed; at most 1000).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    lr: float = Field(2e-5, gt=0.0, le=1.0, description="Peak learning rate (AdamW; at most 1).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, description="Rows per forward/backward (and per pool unless pruning.selection_batch_size).")
    grad_accum_steps: int = Field(1, ge=1, description="Pools per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm; null disables.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute precision (autocast) of scoring and training. auto: bf16 on a GPU that supports it, "
        "fp32 on CPU; bf16 and fp16 need a GPU (checked when training starts, before anything loads); fp16 adds a "
        "loss scaler.",
    )
    weight_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="dtype the weights are loaded in. auto: bf16 for the frozen base of LoRA when the compute "
        "precision is bf16 (half the memory; the adapters stay fp32), fp32 otherwise. bf16 with full fine-tuning "
        "is pure-bf16 training (AdamW updates in bf16 lose small steps); fp32 keeps fp32 master weights.",
    )
    fused_adamw: bool = Field(
        True,
        description="AdamW's fused kernel (CPU and CUDA): the same update up to float rounding, about 10x faster than "
        "the per-tensor loop on a CPU. false: the loop, as in runs recorded before issue 8 (rounding differences "
        "can move a later triage threshold).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward instead of keeping them: about a "
        "third more compute for activation memory of one layer (7B models, long rows). The scoring forward is "
        "no-grad and unaffected.",
    )
    layout: Literal["packed", "padded"] = Field(
        "packed",
        description="How a step's rows are fed to the model, after triage (no pruning decision depends on it). "
        "packed: rows share lanes back to back, position_ids restarting per row (no padding but lane tails); "
        "padded: one row per lane, padded to the longest row of its micro-batch (the pre-issue-8 layout).",
    )
    pack_tokens: int = Field(
        PACK_TOKENS,
        ge=16,
        description="layout: packed. Target tokens per lane: a step's rows are spread over ceil(tokens / pack_tokens) "
        "lanes of even load. With sdpa/eager a lane's attention is lane x lane (masked block-diagonal), so keep it "
        "a few typical rows long; flash_attention_2 attends within each row only.",
    )
    seed: int = Field(0, description="Seed for initialisation, data order and random selectors.")
    output_dir: str = Field("runs/default", description="Run folder: metrics.jsonl, checkpoints/, final/.")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every N optimizer steps (always at the end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept on disk while training (oldest deleted).")
    keep_checkpoints_after_training: bool = Field(
        False,
        description="Keep the resumable checkpoints (weights + optimizer state, ~3x the model each) once the final "
        "model is written; false frees that space, and a finished run is then not resumable past its end.",
    )
    group_by_length: bool = Field(
        False,
        description="layout: padded. Sort a step's trained rows by length before cutting them into micro-batches "
        "(less padding). Rows are grouped after triage, so pools and pruning decisions do not change.",
    )
    score_chunk_tokens: int = Field(
        SCORE_CHUNK_TOKENS,
        ge=16,
        description="Positions per chunk of the LM head, in scoring and in the training loss: its fp32 logits are "
        "chunk x vocab (512 x 49,152 x 4 B = 100 MB, two such buffers at a time) instead of a micro-batch's whole.",
    )
    log_every_steps: int = Field(1, ge=1, description="Write metrics every N optimizer steps.")
    eval_every_steps: int | None = Field(
        None,
        ge=1,
        description="Measure the held-out loss (eval/loss, eval/ppl: mean NLL over the held-out rows' response "
        "tokens, no grad, chunked like scoring) every N optimizer steps. It is always measured at the end when the "
        "data has a held-out split (data.eval_rows or data.eval_source); null: at the end only.",
    )
    log_with: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="accelerate trackers that receive every logged step's metrics beside metrics.jsonl, e.g. "
        "[tensorboard] (written under training.output_dir) or [wandb]; each needs its package installed. MLflow is "
        "the pipeline's own record and is not among them.",
    )
    accelerate_config: str | None = Field(
        None, description="An accelerate config file (DDP/FSDP/DeepSpeed) used by `accelerate launch`."
    )


class ExperimentConfig(_YamlFile):
    """A single training run: model, data, pruning, training."""

    name: str = Field(
        "qtuning", pattern=NAME_PATTERN,
        description="Run name (MLflow run name, output folder): letters, digits, '.', '_', '-'.",
    )
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
        if self.training.eval_every_steps is not None and not self.data.has_heldout:
            problems.append(
                f"training.eval_every_steps={self.training.eval_every_steps} needs a held-out split; set data.eval_rows "
                "(e.g. 16) or data.eval_source, or remove training.eval_every_steps"
            )
        t, m = self.training, self.model
        if t.weight_dtype == "bf16" and t.precision in ("fp16", "fp32"):
            problems.append(
                f"training.weight_dtype: bf16 with training.precision: {t.precision} would compute in a dtype the "
                "weights do not have; use training.precision: bf16 (or auto) or training.weight_dtype: fp32"
            )
        if m.attn_implementation == "flash_attention_2" and t.precision == "fp32":
            problems.append(
                "model.attn_implementation: flash_attention_2 runs in bf16/fp16 only; set training.precision: bf16 "
                "(or auto on a bf16 GPU) or use model.attn_implementation: sdpa"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def pool_size(self) -> int:
        return self.pruning.selection_batch_size or self.training.micro_batch_size



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


def parse_overrides(items: list[str], option: str = "--set") -> dict[str, Any]:
    """`["pruning.sample_ratio=0.5", "training.lr=1e-4"]` -> {dotted key: YAML value}, for `with_overrides`: the
    one parser behind every command's `--set KEY=VALUE`."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE, e.g. pruning.sample_ratio=0.5")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{option} {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


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


# ---- evaluation -------------------------------------------------------------------------------------------
# The five benchmarks of the paper, as lm-eval tasks bundled with qtuning (offline data, see qtuning.evaluation).
BUNDLED_TASKS: tuple[str, ...] = ("qt_arc_easy", "qt_arc_challenge", "qt_gsm8k", "qt_squad", "qt_triviaqa")
GSM8K_MAX_FEWSHOT = 8  # the standard chain-of-thought exemplars (Wei et al. 2022)


class EvalConfig(_Frozen):
    """How a checkpoint is benchmarked (lm-eval, greedy decoding)."""

    tasks: list[str] = Field(
        default_factory=lambda: list(BUNDLED_TASKS),
        min_length=1,
        description="Tasks to run: the bundled qt_* tasks (offline), any lm-eval task or group name, "
        "or a path to a task YAML. Names other than qt_* usually need the hub (set offline: false).",
    )
    limit: int | None = Field(
        None, ge=1, description="Score only the first N items of each task (smoke runs); None scores all."
    )
    batch_size: int = Field(8, ge=1, description="Requests per forward pass.")
    max_gen_toks: int = Field(256, ge=1, description="Token budget of a GSM8K chain of thought.")
    max_gen_toks_short: int = Field(
        32, ge=1, description="Token budget of a SQuAD or TriviaQA answer (generation also stops at a newline)."
    )
    num_fewshot_gsm8k: int = Field(
        4,
        ge=0,
        le=GSM8K_MAX_FEWSHOT,
        description="Chain-of-thought exemplars before each GSM8K question (the paper: 4).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': cuda when available, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype while evaluating. 'auto': bfloat16 on cuda (when supported), float32 on cpu, "
        "where bf16 matmuls are slow.",
    )
    chat_template: bool = Field(
        False,
        description="Wrap each prompt in the tokenizer's chat template (few-shot examples as earlier turns). "
        "Off as in the paper, which scores base models; instruct models often answer the plain "
        "'Question: ... Answer:' prompt with an immediate end-of-turn token.",
    )
    offline: bool = Field(
        True,
        description="Forbid hub access while evaluating (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), restored "
        "afterwards. The qt_* tasks and a local model folder need none; set false for hub tasks or models.",
    )


# ---- comparisons: the pipeline's arms, evaluation and orchestration ---------------------------------------

FULL_DATA = {"sample": "all", "token": "all", "sample_ratio": 1.0, "token_ratio": 1.0}


class ArmConfig(_Frozen):
    """One arm of a comparison: a pruning recipe trained on the comparison's shared model, data and steps."""

    name: str = Field(
        ...,
        pattern=NAME_PATTERN,
        description="Arm name: the MLflow child run, the table row and part of the output folder "
        "(letters, digits, '.', '_', '-').",
    )
    pruning: PruningConfig = Field(PruningConfig(), description="Sample and token rules of this arm.")
    mode: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="dynamic: every pool is re-scored by the model being trained (the paper); static: the base "
        "model's EU scores triage the whole data set once and the kept rows train whole, with the same number of "
        "optimizer steps and trained samples (see static_batch). Token pruning is dynamic only.",
    )
    static_batch: Literal["scaled", "same"] = Field(
        "scaled",
        description="Rows per optimizer step of a static arm. scaled: round(pool x sample_ratio) (pool = "
        "pruning.selection_batch_size or training.micro_batch_size), so the arm takes the full-data arm's number of "
        "optimizer steps and trains as many rows as a dynamic arm; same: the configured pool (fewer steps, the same "
        "learning-rate schedule over them).",
    )

    @model_validator(mode="after")
    def _check(self) -> ArmConfig:
        if self.mode == "static" and self.pruning.sample != "qtuning":
            raise ValueError(
                f"arm {self.name!r}: mode: static triages the data set on the EU plane, so it needs "
                f"pruning.sample: qtuning (got {self.pruning.sample}); use mode: dynamic for this rule"
            )
        return self

    @property
    def is_full_data(self) -> bool:
        return self.pruning.is_full_data


def _default_arms() -> list[ArmConfig]:
    return [
        ArmConfig(name="full", pruning=PruningConfig(**FULL_DATA)),
        ArmConfig(name="qtuning-25x50", pruning=PruningConfig(sample="qtuning", token="qtuning", sample_ratio=0.25, token_ratio=0.5)),
    ]


class PipelineConfig(_Frozen):
    """How the Prefect pipeline runs the stages and where it keeps their outputs and records."""

    runs_dir: str = Field(
        "runs",
        description="Folder for every stage's outputs (tokenized data, EU scores, plans, checkpoints, evaluations), "
        "one sub-folder per content hash; relative paths resolve against the working directory.",
    )
    launcher: Literal["accelerate", "python"] = Field(
        "accelerate",
        description="How training starts: `accelerate launch -m qtuning.train` (DDP/FSDP via training.accelerate_config) "
        "or `python -m qtuning.train` (one process).",
    )
    num_processes: int = Field(
        1, ge=1, description="Training processes (accelerate launch --num_processes); on CPU, >1 runs gloo DDP."
    )
    # Multi-node training: every machine runs the same pipeline config but for its machine_rank, on a runs_dir they
    # share (machine 0's main process writes the final model and summary.json, which every machine's task reads).
    # Each of these, when set, is passed to `accelerate launch` and wins over training.accelerate_config's value;
    # left null, the file's value holds (without a file: 1 machine, rank 0, accelerate's 127.0.0.1:29500).
    num_machines: int | None = Field(
        None,
        ge=1,
        description="Machines the training spans (accelerate launch --num_machines); pipeline.num_processes (or the "
        "accelerate config's num_processes) counts the processes of all of them, the same number on each. null: "
        "training.accelerate_config's num_machines, else 1.",
    )
    machine_rank: int | None = Field(
        None,
        ge=0,
        description="This machine's rank, 0 to num_machines - 1 (--machine_rank); machine 0 runs the main process and "
        "the rendezvous. null: training.accelerate_config's machine_rank, else 0.",
    )
    main_process_ip: str | None = Field(
        None,
        description="Hostname or IP address of machine 0 as the other machines reach it (--main_process_ip); needed "
        "when num_machines > 1. null: training.accelerate_config's main_process_ip.",
    )
    main_process_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="TCP port of the rendezvous on machine 0 (--main_process_port), free there and open to the other "
        "machines. null: training.accelerate_config's main_process_port, else accelerate's 29500.",
    )
    train_retries: int = Field(
        1, ge=0, description="Prefect retries of a failed training run; each one resumes from the last checkpoint."
    )
    score_batch_size: int = Field(8, ge=1, description="Rows per forward of the static EU pass.")
    token_view_samples: int = Field(
        4, ge=0, description="Q2 samples shown in each pruned arm's HTML view of pruned tokens (0: no view)."
    )
    zero_shot: bool = Field(
        False, description="Also evaluate the untrained model as a 'zero-shot' row of the comparison."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else a SQLite store and artifact folder "
        "under the repository's mlflow/ (see mlflow/tracking.yaml).",
    )
    experiment_name: str = Field("qtuning", min_length=1, description="MLflow experiment the runs are filed under.")
    progress: bool = Field(True, description="Progress bars on the terminal (training, scoring, evaluation).")
    log_model: bool = Field(
        False,
        description="Also log each arm's final model to its MLflow run (mlflow.transformers.log_model: a copy of the "
        "weights in the artifact store, ~500 MB for SmolLM2-135M). Off: the run records the checkpoint's path.",
    )
    work_pool: str | None = Field(
        None,
        min_length=1,
        description="Run the arms on this Prefect work pool: each (seed, arm) becomes a flow run of the "
        "pipeline.experiment_deployment, its workers train them in parallel (as many at a time as the pool's and the "
        "workers' concurrency limits let through: one per GPU is `prefect worker start --limit 1` on each GPU), "
        "and this flow waits for them and builds the same table. Needs a Prefect server every worker reaches "
        "(PREFECT_API_URL), the deployment on that pool (`qtuning serve --work-pool POOL --flows experiment`), and "
        "pipeline.runs_dir and Prefect's result storage on storage every worker sees. null: every arm runs in "
        "this process, one after another.",
    )
    experiment_deployment: str = Field(
        "experiment/qtuning-experiment",
        pattern=r"^[^/\s]+/[^/\s]+$",
        description="With pipeline.work_pool: the deployment each arm runs as, '<flow>/<deployment>' (what "
        "`qtuning serve --work-pool` registers: experiment/qtuning-experiment).",
    )
    register_best: bool = Field(
        False,
        description="Register the comparison's best trained arm (highest benchmark average, then lowest held-out loss) "
        "in the MLflow model registry as '<comparison name>-best' (mlflow.register_model); needs pipeline.log_model.",
    )

    @field_validator("main_process_ip")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        import ipaddress
        import re

        if v is None:
            return v
        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        label = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
        if len(v) <= 253 and all(label.fullmatch(part) for part in v.removesuffix(".").split(".")):
            return v
        raise ValueError(f"{v!r} is neither an IP address nor a hostname (dot-separated labels of letters, digits "
                         "and inner '-'); give machine 0's address, e.g. 10.0.0.1 or node0.cluster")

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        problems = []
        if self.num_processes > 1 and self.launcher == "python":
            problems.append(
                f"pipeline.num_processes={self.num_processes} needs pipeline.launcher: accelerate "
                "(python -m qtuning.train runs one process)"
            )
        machines = self.num_machines or 1
        if self.machine_rank is not None and self.num_machines is not None and self.machine_rank >= machines:
            problems.append(
                f"pipeline.machine_rank={self.machine_rank} with pipeline.num_machines={machines}: ranks run from 0 "
                f"to {machines - 1}"
            )
        if self.launcher == "python" and (machines > 1 or self.machine_rank):
            problems.append("pipeline.num_machines / machine_rank need pipeline.launcher: accelerate "
                            "(python -m qtuning.train runs one process on one machine)")
        if machines > 1 and self.num_processes > 1 and self.num_processes % machines:
            problems.append(
                f"pipeline.num_processes={self.num_processes} counts the processes of all {machines} machines, the "
                f"same number on each: use a multiple of pipeline.num_machines"
            )
        if self.register_best and not self.log_model:
            problems.append(
                "pipeline.register_best: true registers a logged model; set pipeline.log_model: true as well "
                "(or register_best: false)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class CompareConfig(_YamlFile):
    """A comparison: full-data SFT and pruned arms on the same model, data, steps and evaluation.

    The defaults are the embedded main job (`qtuning run`): SmolLM2-135M-Instruct, 24 ShareGPT rows of at
    most 256 tokens trained for 2 epochs (6 optimizer steps of 8 rows, so the selection log shows how samples
    move between quadrants from one epoch to the next) and 16 more rows held out (their loss is measured at the
    end: a quality signal that moves on a run this small), full data vs Q-Tuning 25%x50%, 8 items of
    each of the five benchmarks (GSM8K chains of thought cut at 128 tokens).
    """

    name: str = Field("compare", pattern=NAME_PATTERN, description="Comparison name (the MLflow parent run, part of "
                      "folder names): letters, digits, '.', '_', '-'.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(limit=24, max_length=256, eval_rows=16)
    training: TrainingConfig = TrainingConfig(epochs=2.0, lr=2e-5, micro_batch_size=8, schedule="cosine")
    arms: list[ArmConfig] = Field(
        default_factory=_default_arms,
        min_length=1,
        description="The arms; one must be full data (pruning.sample: all, token: all), the baseline of ratio_to_full.",
    )
    evaluation: EvalConfig = EvalConfig(limit=8, max_gen_toks=128)
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        problems = []
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"arms: names must be unique, {', '.join(dupes)} repeat(s); rename the arms")
        if self.pipeline.zero_shot and "zero-shot" in names:
            problems.append("arms: 'zero-shot' is the row of pipeline.zero_shot: true; rename that arm")
        if not any(a.is_full_data for a in self.arms):
            problems.append(
                "arms: no full-data arm, the baseline of ratio_to_full; add "
                "{name: full, pruning: {sample: all, token: all, sample_ratio: 1.0, token_ratio: 1.0}}"
            )
        if self.pipeline.zero_shot and self.model.random_init:
            problems.append("pipeline.zero_shot: true needs pretrained weights; set model.random_init: false or zero_shot: false")
        for i, arm in enumerate(self.arms):
            try:
                self.experiment(arm)
            except (ValidationError, ValueError) as e:
                msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
                problems.append(f"arms[{i}] ({arm.name}): {msg.removeprefix('Value error, ')}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def baseline_arm(self) -> ArmConfig:
        """The first full-data arm: the denominator of ratio_to_full."""
        return next(a for a in self.arms if a.is_full_data)

    @property
    def reference_arm(self) -> ArmConfig:
        """The first pruned arm (else the baseline): its ratio and entropy scope draw the parent run's EU plane."""
        return next((a for a in self.arms if not a.is_full_data), self.baseline_arm)

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def experiment(self, arm: ArmConfig) -> ExperimentConfig:
        """The single run an arm trains: the shared model, data and training with the arm's pruning."""
        return ExperimentConfig(name=arm.name, model=self.model, data=self.data, pruning=arm.pruning, training=self.training)



# ---- sweeps: grids of arms around one shared recipe ---------------------------------------------------------
SWEEP_ARM_FIELDS = ("mode",)  # besides pruning.*: the arm's scoring mode
SEED_AXIS = "training.seed"


class SweepConfig(_YamlFile):
    """A grid (or an explicit list) of pruned arms around one shared model, data, training and evaluation.

    Axes are dotted paths: any `pruning.*` field, `mode` (dynamic/static) and `training.seed`. Shared
    settings (model, data, the rest of training) are the sweep's own, so the full-data baseline, always
    included, is the same run for every arm of a seed and is trained once (also across sweeps, by the cache).

        grid: {pruning.sample_ratio: [0.125, 0.25, 0.5], pruning.token_ratio: [0.5, 0.7]}
        points: [{pruning.sample: random, pruning.token: random}, {pruning.sample: infobatch}]
    """

    name: str = Field("sweep", pattern=NAME_PATTERN, description="Sweep name (the MLflow parent run, part of folder "
                      "names): letters, digits, '.', '_', '-'.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(limit=64, max_length=256)
    training: TrainingConfig = TrainingConfig(epochs=1.0, lr=2e-5, micro_batch_size=8, schedule="cosine")
    base: PruningConfig = Field(PruningConfig(), description="Pruning every arm starts from (Q-Tuning 25% x 50%).")
    mode: Literal["dynamic", "static"] = Field("dynamic", description="Arm mode unless an axis sets `mode`.")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Axes crossed as a grid: dotted path -> values. training.seed repeats every arm."
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list, description="Explicit arms, each a dict of dotted path -> value (crossed with the seeds)."
    )
    evaluation: EvalConfig = EvalConfig(limit=10)
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        problems = []
        pruning_fields = set(PruningConfig.model_fields)
        for where, axes in [("grid", self.grid)] + [(f"points[{i}]", p) for i, p in enumerate(self.points)]:
            for path, value in axes.items():
                section, _, leaf = path.partition(".")
                ok = (section == "pruning" and leaf in pruning_fields) or path in SWEEP_ARM_FIELDS or path == SEED_AXIS
                if not ok:
                    problems.append(
                        f"{where}.{path}: not a sweep axis; vary pruning.<field>, mode or training.seed (shared settings "
                        "such as the model, data or learning rate belong to the sweep itself, so the full-data baseline shares them)"
                    )
                if where == "grid" and (not isinstance(value, list) or not value):
                    problems.append(f"grid.{path}: expected a non-empty list of values, got {value!r}")
        if SEED_AXIS in {k for p in self.points for k in p}:
            problems.append(f"points: put {SEED_AXIS} in grid (it repeats every point), not in a point")
        for over in self.arm_overrides():
            pruning = {**self.base.model_dump(), **{k.removeprefix("pruning."): v for k, v in over.items() if k.startswith("pruning.")}}
            try:
                PruningConfig(**pruning)
            except ValidationError as e:
                for err in e.errors():
                    field = ".".join(str(x) for x in err["loc"]) or "pruning"
                    problems.append(f"arm {over}: pruning.{field}: {err['msg'].removeprefix('Value error, ')}".replace("pruning.pruning", "pruning"))
        if not problems:
            try:
                self.comparisons()
            except (ValidationError, ValueError) as e:
                problems.append(f"an arm of the sweep is invalid: {e}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.grid.get(SEED_AXIS, [self.training.seed])]

    def arm_overrides(self) -> list[dict[str, Any]]:
        """Every pruned arm as dotted overrides of `base`/`mode`: the grid's product, then the explicit points."""
        import itertools

        axes = {k: v for k, v in self.grid.items() if k != SEED_AXIS}
        out = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else []
        out += [dict(p) for p in self.points]
        return out or [{}]

    def arms(self) -> list[ArmConfig]:
        """The full-data baseline, then each distinct pruned arm, named by its recipe."""
        arms = [ArmConfig(name="full", pruning=PruningConfig(**FULL_DATA))]
        seen = set()
        for over in self.arm_overrides():
            pruning = self.base.model_dump()
            pruning.update({k.removeprefix("pruning."): v for k, v in over.items() if k.startswith("pruning.")})
            if pruning["sample"] == "all" and pruning["token"] == "all":
                continue  # the baseline is already there
            arm = ArmConfig(name=_arm_name(pruning, over, self.base, over.get("mode", self.mode)),
                            pruning=PruningConfig(**pruning), mode=over.get("mode", self.mode))
            if arm.name not in seen:
                seen.add(arm.name)
                arms.append(arm)
        return arms

    def comparisons(self) -> list[CompareConfig]:
        """One comparison per seed, each with the baseline and every arm."""
        arms = self.arms()
        return [
            CompareConfig(
                name=f"{self.name}-seed{seed}", model=self.model, data=self.data,
                training=self.training.model_copy(update={"seed": seed}), arms=arms,
                evaluation=self.evaluation, pipeline=self.pipeline,
            )
            for seed in self.seeds
        ]



_SHORT = {"sample_ratio": "rs", "token_ratio": "rt", "lam": "lam"}


def _arm_name(pruning: dict, over: dict, base: PruningConfig, mode: str) -> str:
    """A readable, unique name: rules and budgets always, then any other field that differs from the base."""
    parts = [pruning["sample"], pruning["token"], f"rs{pruning['sample_ratio']:g}", f"rt{pruning['token_ratio']:g}"]
    for field in PruningConfig.model_fields:
        if field in ("sample", "token", "sample_ratio", "token_ratio"):
            continue
        if pruning[field] != getattr(base, field) or f"pruning.{field}" in over:
            parts.append(f"{_SHORT.get(field, field)}{pruning[field]}")
    if mode == "static":
        parts.append("static")
    return "-".join(str(p).replace("_", "") for p in parts)
