"""Structured configs of the Hydra application.

The YAML files under conf/ only fill these dataclasses (Hydra's structured-config pattern);
each dataclass validates itself in ``__post_init__`` and names the fix. ``main()`` converts the
composed config once with ``OmegaConf.to_object`` and nothing below it sees Hydra.

Every field that configures the library takes its default and its allowed values from the
library's own dataclasses (``adalora.AdapterConfig``, ``ScheduleConfig``, ``ScoreConfig``), and
is validated by building them: one source of truth. A value the application wants different
is set in a YAML file under conf/, with a comment saying why.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Dict, List, Optional

import adalora
from adalora.config import FUSE_MODES, ORTH_FORMS, SCHEDULE_SHAPES, SCORE_KINDS


class ConfigError(ValueError):
    """A user-facing configuration or input error: printed as one line, exit code 2."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def library_default(owner, name: str):
    """The library's default for ``name``: a dataclass field, or a keyword of a function."""
    if isinstance(owner, type) and hasattr(owner, "__dataclass_fields__"):
        f = {f.name: f for f in fields(owner)}[name]
        return f.default_factory() if f.default is MISSING else f.default
    return inspect.signature(owner).parameters[name].default


def _lib(owner, name: str):
    """A dataclass default taken from the library (a fresh copy for mutable values)."""
    default = library_default(owner, name)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default))
    return field(default=default)


def _validated(section: str, build) -> None:
    """Build a library config to validate: its ValueError, re-labelled for the YAML section."""
    try:
        build()
    except ValueError as e:
        raise ConfigError(f"{section}: {str(e).splitlines()[0]}") from None


METHODS = ("adalora", "lora", "svd_lora", "full", "head", "peft_adalora", "peft_lora", "sora", "elalora",
           "eva", "svd_truncate")
# Methods with a rank allocator and so a target budget (experiments/allocators.py builds them).
ALLOCATING = ("adalora", "peft_adalora", "sora", "elalora", "eva", "svd_truncate")
# method.scale: what the update's α is divided by. SVD adapters: their initial rank r0 (the
# reference rule), the target rank (AdaLoRA's update then scales like the matched LoRA's), or
# √r0. LoRA: each module's own rank, one shared rank (the mean; for ranks AdaLoRA found, its
# target) so that a rank pattern does not also change the scale, or √r.
SVD_SCALES = ("alpha_over_r0", "alpha_over_target", "rslora")
LORA_SCALES = ("per_module", "uniform", "rslora")
_LIB_TOTAL = library_default(adalora.ScheduleConfig, "total_steps")


@dataclass
class MethodConfig:
    name: str = "adalora"
    # null: every linear map of each block of the model (experiments/model.py, by model type),
    # as the paper adapts; or module-name suffixes, or target_regex.
    targets: Optional[List[str]] = None
    target_regex: Optional[str] = _lib(adalora.AdapterConfig, "target_regex")
    # AdaLoRA / svd_lora: the initial rank r0 of every SVD adapter. lora: the LoRA rank r
    # (replaced by the matched rank under budget=matched).
    init_rank: int = _lib(adalora.AdapterConfig, "init_rank")
    alpha: float = _lib(adalora.AdapterConfig, "alpha")
    dropout: float = _lib(adalora.AdapterConfig, "dropout")
    rslora: bool = _lib(adalora.AdapterConfig, "rslora")
    scale: Optional[str] = None            # null: alpha_over_r0 (SVD) or per_module (LoRA)
    # auto | none | epilogue | triton | stack: the adapters' path (adalora/README.md, "Fused paths").
    fuse: str = _lib(adalora.AdapterConfig, "fuse")
    # SVD adapters: every lam a view of one parameter (adalora/gate_bank.py); the same training.
    # null: on for every method that takes it (the app's optimizer and checkpoints need no
    # parameter per adapter, and an eager step gets faster); false: a lam per adapter.
    flat_gates: Optional[bool] = None
    # Every P and Q (LoRA: A and B) a view of one parameter per kind and width; the same training.
    # null: on for every method but svd_truncate (which restarts one adapter's Adam state).
    flat_factors: Optional[bool] = None
    orth_weight: float = 0.1               # γ; the paper's GLUE runs use 0.1 to 0.5
    orth_form: str = _lib(adalora.orthogonality_penalty, "form")
    # lora only: per-module ranks {name_or_suffix: r}; or read from a finished AdaLoRA run.
    rank_pattern: Dict[str, int] = _lib(adalora.AdapterConfig, "rank_pattern")
    rank_pattern_from: Optional[str] = None
    # Allocation families (adalora/README.md): SoRA's ξ and its budget controller, ElaLoRA's
    # pruned share per mask step and start rank (null: half the target rank, at least 1), the
    # batches EVA's PCA sees before training.
    sora_xi: float = _lib(adalora.SoRAConfig, "xi")
    sora_adapt: float = _lib(adalora.SoRAConfig, "adapt")
    elalora_prune_ratio: float = _lib(adalora.ElaLoRAConfig, "prune_ratio")
    elalora_start_rank: Optional[int] = None
    eva_batches: int = 8

    def __post_init__(self) -> None:
        _check(self.name in METHODS,
               f"unknown method '{self.name}'; choose one of {', '.join(METHODS)}")
        _check(self.init_rank >= 1, f"method.init_rank={self.init_rank} must be >= 1")
        _check(self.orth_weight >= 0, "method.orth_weight must be >= 0")
        _check(self.fuse in FUSE_MODES, f"method.fuse='{self.fuse}'; choose one of {', '.join(FUSE_MODES)}")
        _check(self.flat_gates in (None, True, False), f"method.flat_gates={self.flat_gates!r}: use null, true or false")
        _check(self.flat_factors in (None, True, False),
               f"method.flat_factors={self.flat_factors!r}: use null, true or false")
        _check(not self.flat_gates or (self.uses_svd and self.ours),
               f"method.flat_gates=true is for this toolkit's SVD adapters (lam); method={self.name} has none: drop it")
        _check(not self.flat_factors or self.ours,
               f"method.flat_factors=true is for this toolkit's adapters; method={self.name} takes none: drop it")
        _check(not self.flat_factors or self.name != "svd_truncate",
               "method.flat_factors=true: svd_truncate restarts each adapter's optimizer state, which a "
               "shared parameter cannot; drop it")
        _check(self.orth_form in ORTH_FORMS,
               f"method.orth_form='{self.orth_form}'; choose one of {', '.join(ORTH_FORMS)}")
        _check(self.targets is None or bool(self.targets) or bool(self.target_regex)
               or self.name in ("full", "head"),
               "method.targets is empty; give module-name suffixes, null (every linear map) or "
               "method.target_regex")
        if self.name in ("full", "head"):
            _check(self.scale is None, f"method.scale is for adapters; method={self.name} has none")
        else:
            allowed = SVD_SCALES if self.uses_svd else LORA_SCALES
            _check(self.scale is None or self.scale in allowed,
                   f"method.scale='{self.scale}' for method={self.name}; choose one of {', '.join(allowed)}")
            _check(self.scale != "alpha_over_target" or self.prunes,
                   "method.scale=alpha_over_target needs a target rank: use it with a pruning method")
            _check(not self.rslora or self.scale in (None, "rslora"),
                   f"method.rslora=true and method.scale={self.scale} disagree: drop one")
            _validated("method", lambda: self.adapter_config(["_"], self.init_rank))
        _validated("method", lambda: (adalora.SoRAConfig(xi=self.sora_xi, adapt=self.sora_adapt),
                                      adalora.ElaLoRAConfig(prune_ratio=self.elalora_prune_ratio)))
        _check(self.elalora_start_rank is None or self.elalora_start_rank >= 1,
               "method.elalora_start_rank must be null or >= 1")
        _check(self.eva_batches >= 1, "method.eva_batches must be >= 1")

    @property
    def scale_rule(self) -> Optional[str]:
        if self.name in ("full", "head"):
            return None
        if self.scale is not None:
            return self.scale
        return "rslora" if self.rslora else ("alpha_over_r0" if self.uses_svd else "per_module")

    @property
    def uses_svd(self) -> bool:
        return self.name in ("adalora", "svd_lora", "peft_adalora", "sora", "elalora", "eva")

    @property
    def ours(self) -> bool:
        """Trains this toolkit's adapters (not peft's, and not full or head-only training)."""
        return self.name not in ("full", "head") and not self.name.startswith("peft_")

    @property
    def flat(self) -> tuple:
        """``(flat_gates, flat_factors)`` as injected: null means on wherever the method takes it."""
        gates = self.uses_svd and self.ours if self.flat_gates is None else self.flat_gates
        factors = self.ours and self.name != "svd_truncate" if self.flat_factors is None else self.flat_factors
        return gates, factors

    @property
    def prunes(self) -> bool:
        """Has a rank allocator, and so a target budget (every family, not only pruning ones)."""
        return self.name in ALLOCATING

    def adapter_config(self, targets: List[str], init_rank: int,
                       rank_pattern: Optional[Dict[str, int]] = None) -> adalora.AdapterConfig:
        flat_gates, flat_factors = self.flat
        return adalora.AdapterConfig(
            method="adalora" if self.uses_svd else "lora", targets=list(targets),
            target_regex=self.target_regex, init_rank=init_rank, alpha=self.alpha,
            dropout=self.dropout, rslora=self.scale_rule == "rslora", fuse=self.fuse, flat_gates=flat_gates,
            flat_factors=flat_factors,
            rank_pattern=dict(self.rank_pattern if rank_pattern is None else rank_pattern))


@dataclass
class ScheduleSection:
    """AdaLoRA budget schedule and importance score. total_steps is derived, never typed."""
    target_rank: Optional[float] = _lib(adalora.ScheduleConfig, "target_rank")
    target_total: Optional[int] = _lib(adalora.ScheduleConfig, "target_total")
    # Absolute steps win; otherwise a ratio of the derived total_steps. The ratios default to
    # the library's warmups over its total_steps.
    init_warmup: Optional[int] = None
    init_warmup_ratio: float = library_default(adalora.ScheduleConfig, "init_warmup") / _LIB_TOTAL
    final_warmup: Optional[int] = None
    final_warmup_ratio: float = library_default(adalora.ScheduleConfig, "final_warmup") / _LIB_TOTAL
    mask_interval: int = _lib(adalora.ScheduleConfig, "mask_interval")
    shape: str = _lib(adalora.ScheduleConfig, "shape")
    beta1: float = _lib(adalora.ScoreConfig, "beta1")
    beta2: float = _lib(adalora.ScoreConfig, "beta2")
    score: str = _lib(adalora.ScoreConfig, "kind")
    score_before_step: bool = _lib(adalora.RankAllocator, "score_before_step")
    # values: budgets count singular values; params: d_in + d_out + 1 per singular value
    # (adalora/accounting.py). AdaLoRA's own schedule counts values.
    budget_unit: str = _lib(adalora.SoRAAllocator, "unit")

    def __post_init__(self) -> None:
        _check(self.shape in SCHEDULE_SHAPES,
               f"schedule.shape='{self.shape}'; choose one of {', '.join(SCHEDULE_SHAPES)}")
        _check(self.score in SCORE_KINDS,
               f"schedule.score='{self.score}'; choose one of {', '.join(SCORE_KINDS)}")
        for k in ("init_warmup_ratio", "final_warmup_ratio"):
            _check(0.0 <= getattr(self, k) < 1.0, f"schedule.{k} must be in [0, 1)")
        _check(self.mask_interval >= 1, "schedule.mask_interval must be >= 1")
        _check(self.budget_unit in adalora.accounting.UNITS,
               f"schedule.budget_unit='{self.budget_unit}'; choose one of {', '.join(adalora.accounting.UNITS)}")
        _validated("schedule", lambda: self.score_config(seed=0))

    def warmups(self, total_steps: int) -> tuple[int, int]:
        ti = self.init_warmup if self.init_warmup is not None else \
            int(round(self.init_warmup_ratio * total_steps))
        tf = self.final_warmup if self.final_warmup is not None else \
            int(round(self.final_warmup_ratio * total_steps))
        return ti, tf

    def score_config(self, seed: int) -> adalora.ScoreConfig:
        return adalora.ScoreConfig(beta1=self.beta1, beta2=self.beta2, kind=self.score, seed=seed)


OBJECTIVES = ("classify", "answer", "corpus")
TASK_METRICS = {"classify": ("accuracy", "macro_f1", "mcc"),
                "answer": ("accuracy", "macro_f1", "mcc", "exact_match", "perplexity"),
                "corpus": ("perplexity",)}


@dataclass
class TaskConfig:
    name: str = "rotten_tomatoes"
    # "rotten_tomatoes" | "reuters_r8" | "reuters_r52" | "hf:<path>[/<config>]" | "file:<path>"
    dataset: str = "rotten_tomatoes"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    max_len: int = 64
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # Fractions of a hash split, used when the source has no val/test split of its own.
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    metric: str = "accuracy"
    # classify: encoder + pooled head, cross-entropy on the label. answer: a causal LM, loss on
    # the answer tokens of prompt + answer, scored by greedy generation (exact_match) and, when
    # the answers are label words, by the most likely label word (accuracy). corpus: a causal
    # LM on whole texts, scored by perplexity (experiments/lm.py).
    objective: str = "classify"
    prompt: str = "{text}"                  # answer: the prompt, {text} = the example's text
    label_words: Optional[List[str]] = None  # answer: the answer of each label (null: label names)
    prompt_column: str = "prompt"           # answer on file: data, one prompt and its response
    response_column: str = "response"

    def __post_init__(self) -> None:
        _check(self.max_len >= 8, "task.max_len must be >= 8")
        _check(0 < self.val_fraction < 0.5 and 0 < self.test_fraction < 0.5,
               "task.val_fraction and task.test_fraction must be in (0, 0.5)")
        _check(self.objective in OBJECTIVES,
               f"task.objective='{self.objective}'; choose one of {', '.join(OBJECTIVES)}")
        allowed = TASK_METRICS[self.objective]
        _check(self.metric in allowed, f"task.metric={self.metric} for task.objective="
               f"{self.objective}; choose one of {', '.join(allowed)}")
        _check("{text}" in self.prompt, "task.prompt must contain {text} (where the example goes)")
        _check(self.label_words is None or len(set(self.label_words)) == len(self.label_words) >= 2,
               "task.label_words must be two or more distinct words, or null (the label names)")


TINY_ARCHS = ("bert", "deberta_v2", "llama", "gpt2")


@dataclass
class ModelConfig:
    name: str = "minilm"
    # "minilm" (offline package), "tiny-random" (tests), a hub id or a local folder.
    name_or_path: str = "minilm"
    tokenizer: Optional[str] = None        # default: same as name_or_path; tiny-random -> minilm
    pooling: str = "mean"
    head_dropout: float = 0.1
    dropout: Optional[float] = None        # null: the checkpoint's; a value sets every backbone nn.Dropout
    quantize: str = "none"                 # none | nf4 (adalora.quantize_model)
    # Decoders: the stored dtype of the base weights, fp32 (autocast computes in the trainer's
    # precision) or bf16 (half the memory; adapters then take bf16 too, except on an NF4 base).
    dtype: str = "fp32"
    tiny_arch: str = "bert"                # tiny-random: bert | deberta_v2 | llama | gpt2 (decoders)
    tiny_hidden: int = 32
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_intermediate: int = 64
    tiny_kv_heads: Optional[int] = None    # llama: key/value heads (null: tiny_heads)
    tiny_vocab: Optional[int] = None       # null: the tokenizer's size; a value sizes the embedding

    def __post_init__(self) -> None:
        _check(self.pooling in ("mean", "cls"), "model.pooling must be mean or cls")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, "model.dropout must be null or in [0, 1)")
        _check(self.quantize in ("none", "nf4"), "model.quantize must be none or nf4")
        _check(self.dtype in ("fp32", "bf16"), "model.dtype must be fp32 or bf16")
        _check(self.tiny_arch in TINY_ARCHS, f"model.tiny_arch must be one of {', '.join(TINY_ARCHS)}")
        _check(self.tiny_vocab is None or self.tiny_vocab >= 1, "model.tiny_vocab must be null or >= 1")

    @property
    def tiny_decoder(self) -> bool:
        return self.name_or_path == "tiny-random" and self.tiny_arch in ("llama", "gpt2")


@dataclass
class TrainerConfig:
    epochs: float = 1.0
    max_steps: Optional[int] = None        # caps the derived total_steps (smoke tests)
    stop_at_step: Optional[int] = None     # stop early as if pre-empted (schedule unchanged)
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    lr: float = 2e-3
    head_lr: float = 1e-2                  # the fresh head needs more than the adapters
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    warmup_steps: Optional[int] = None     # wins over warmup_ratio when given
    lr_schedule: str = "linear"
    max_grad_norm: float = 1.0
    precision: str = "fp32"                # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    device: str = "auto"
    eval_every: int = 100
    checkpoint_every: int = 0
    resume: Optional[str] = None
    compact: bool = False
    # torch.compile of the training forward: none | default | reduce-overhead (CUDA graphs) |
    # max-autotune. The allocator and the penalty stay eager; evaluation stays eager.
    compile: str = "none"
    compile_backend: str = "inductor"      # aot_eager: trace only, no code generation (debugging)
    num_threads: Optional[int] = None
    progress: bool = True
    # Stop with status failed after this many consecutive optimizer steps with a non-finite
    # loss or gradient (each is skipped: no update, no importance update). With fp16's
    # GradScaler, gradient overflows are the scaler's business; only a non-finite loss counts.
    max_nonfinite_steps: int = 5
    # Under torchrun: ddp. fsdp is refused: sharded adapters would need gathered importance scores.
    strategy: str = "ddp"
    # Capture the optimizer step as CUDA graphs and replay them (experiments/step_graph.py): one
    # GPU, the methods step_graph.METHODS names; batches keep their padded length, and a causal
    # LM's loss takes every position's logits (no boolean selection of the scored ones).
    step_graph: bool = False
    # Only the step after backward as CUDA graphs (experiments/step_graph.py): forward and backward
    # stay eager, so batches keep their own length and grad_accum may be above 1; γ∇R, clipping,
    # AdamW and the allocator replay as graphs.
    tail_graph: bool = False

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1 and self.grad_accum >= 1,
               "trainer.batch_size and trainer.grad_accum must be >= 1")
        _check(self.epochs > 0, "trainer.epochs must be > 0")
        _check(self.lr > 0 and self.head_lr > 0, "trainer.lr and trainer.head_lr must be > 0")
        _check(self.lr_schedule in ("linear", "cosine", "constant"),
               "trainer.lr_schedule must be linear, cosine or constant")
        _check(self.precision in ("fp32", "bf16", "fp16"),
               "trainer.precision must be fp32, bf16 or fp16")
        _check(0.0 <= self.warmup_ratio < 1.0, "trainer.warmup_ratio must be in [0, 1)")
        _check(self.max_steps is None or self.max_steps >= 1, "trainer.max_steps must be >= 1")
        _check(self.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps must be >= 1")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
               f"trainer.device={self.device}: use auto, cpu, cuda or cuda:N")
        _check(self.compile in ("none", "default", "reduce-overhead", "max-autotune"),
               "trainer.compile must be none, default, reduce-overhead or max-autotune")
        _check(self.strategy in ("ddp", "fsdp"), "trainer.strategy must be ddp (or fsdp, not "
               "supported yet)")
        _check(self.strategy != "fsdp", "trainer.strategy=fsdp is not supported yet (sharded "
               "adapters need gathered importance scores); use trainer.strategy=ddp")
        if self.step_graph:
            _check(self.grad_accum == 1, "trainer.step_graph=true needs trainer.grad_accum=1 (one micro-batch "
                   "per graph); or set trainer.step_graph=false")
            _check(self.precision != "fp16", "trainer.step_graph=true needs trainer.precision=bf16 or fp32 "
                   "(fp16's GradScaler decides its step on the host); or set trainer.step_graph=false")
            _check(self.compile != "reduce-overhead", "trainer.step_graph=true needs trainer.compile=none or "
                   "default (the step is already one graph); or set trainer.step_graph=false")
        if self.tail_graph:
            _check(not self.step_graph, "trainer.tail_graph=true and trainer.step_graph=true: pick one "
                   "(step_graph captures the tail too)")
            _check(self.precision != "fp16", "trainer.tail_graph=true needs trainer.precision=bf16 or fp32 "
                   "(fp16's GradScaler decides its step on the host); or set trainer.tail_graph=false")
            _check(self.compile != "reduce-overhead", "trainer.tail_graph=true needs trainer.compile=none or "
                   "default (two kinds of CUDA graph in one step); or set trainer.tail_graph=false")


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    log_every: int = 10


@dataclass
class BudgetConfig:
    # none: use the method's own ranks. matched: method=lora picks the uniform rank whose
    # parameter count is closest to the AdaLoRA target budget of this config (adalora ignores
    # it). from_lora: method=adalora sets target_rank from the parameters of LoRA rank lora_rank.
    match: str = "none"
    lora_rank: int = 8

    def __post_init__(self) -> None:
        _check(self.match in ("none", "matched", "from_lora"),
               "budget.match must be none, matched or from_lora")
        _check(self.lora_rank >= 1, "budget.lora_rank must be >= 1")


@dataclass
class RunConfig:
    seed: int = 0
    ablation: str = "none"
    method: MethodConfig = field(default_factory=MethodConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def __post_init__(self) -> None:
        # numpy's legacy seeding, which seed_everything calls, takes 0 to 2**32 - 1 only
        _check(0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32)")
