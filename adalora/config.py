"""Configuration dataclasses. Each validates itself in ``__post_init__`` and names the fix.

They are owned by the code they configure (layers/inject, schedule, importance) and are the
schemas Hydra's YAML fills; nothing here knows about Hydra.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .fused import FUSE_MODES

METHODS = ("adalora", "lora")
SCHEDULE_SHAPES = ("cubic", "linear", "constant")
SCORE_KINDS = ("sensitivity_uncertainty", "sensitivity", "magnitude", "random_fixed", "random_churn")
ORTH_FORMS = ("reference", "paper")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class AdapterConfig:
    """Which layers get adapters and how they are shaped.

    ``init_rank`` is ``r0`` of the SVD adapters for AdaLoRA and the rank ``r`` for LoRA.
    ``rank_pattern`` overrides the rank per module: keys are full dotted names or suffixes
    (the longest matching key wins), e.g. ``{"layer.5.output.dense": 3}``.

    The update is scaled by ``α / r`` with ``r`` each adapter's initial rank (``r0`` for SVD
    adapters, for the whole run), or ``α / √r`` with ``rslora``. ``scale_rank`` replaces ``r``
    by one number for every adapter: an SVD adapter then scales like a LoRA of that rank
    (e.g. the target rank), and LoRAs of mixed ranks share one scale.

    ``fuse`` picks the adapter's forward and backward (``adalora/fused.py``): ``"none"``
    autograd's two products apart (the reference); ``"epilogue"`` the same products with the
    adapter's shares of the output and of the input gradient added in place, backward by hand;
    ``"triton"`` those shares added inside the frozen GEMMs by a Triton kernel; ``"stack"`` one
    GEMM against ``[W0; D]``; ``"merge"`` one GEMM against ``W0 + s · U (g ⊙ D)`` formed per
    step, faster still, but its forward rounds that sum per weight. ``"auto"`` (the default) is
    epilogue on CUDA tensors, the fastest path that keeps the unfused products' rounding
    (adalora/README.md), and none elsewhere.

    ``flat_gates`` keeps every SVD adapter's ``lam`` in one parameter, each adapter's ``lam`` a
    view of it (adalora/gate_bank.py): the same training, with fewer tensors for autograd, the
    optimizer and the allocator to walk in an eager step. ``flat_factors`` does the same for
    ``P`` and ``Q``: one parameter per kind and width. Not with named adapter sets.
    """

    method: str = "adalora"
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    target_regex: str | None = None
    init_rank: int = 12
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init_std: float = 0.02
    rank_pattern: dict[str, int] = field(default_factory=dict)
    scale_rank: float | None = None
    fuse: str = "auto"
    flat_gates: bool = False
    flat_factors: bool = False

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"AdapterConfig.method={self.method!r}: use one of {METHODS}")
        _check(self.fuse in FUSE_MODES, f"AdapterConfig.fuse={self.fuse!r}: use one of {FUSE_MODES}")
        _check(isinstance(self.flat_gates, bool), f"AdapterConfig.flat_gates={self.flat_gates!r}: use true or false")
        _check(isinstance(self.flat_factors, bool),
               f"AdapterConfig.flat_factors={self.flat_factors!r}: use true or false")
        _check(bool(self.targets) or self.target_regex is not None,
               "AdapterConfig.targets is empty: name module suffixes (e.g. ['query','value']) or set target_regex")
        # list("12") would be ["1", "2"]; peft reads a string as a regex: neither silently
        _check(not isinstance(self.targets, str),
               f"AdapterConfig.targets={self.targets!r} is a string: pass a list of module name suffixes "
               f"(targets=[{self.targets!r}]) or a regex as target_regex")
        self.targets = list(self.targets)
        _check(all(isinstance(t, str) and t for t in self.targets),
               "AdapterConfig.targets must be non-empty strings (module name suffixes)")
        _check(isinstance(self.init_rank, int) and not isinstance(self.init_rank, bool) and self.init_rank >= 0,
               f"AdapterConfig.init_rank={self.init_rank!r}: use an integer >= 0")
        _check(_is_number(self.alpha) and self.alpha > 0, f"AdapterConfig.alpha={self.alpha!r}: use a positive number")
        _check(_is_number(self.dropout) and 0.0 <= self.dropout < 1.0,
               f"AdapterConfig.dropout={self.dropout!r}: use a value in [0, 1)")
        _check(_is_number(self.init_std) and self.init_std > 0,
               f"AdapterConfig.init_std={self.init_std}: use a positive number")
        _check(self.scale_rank is None or (_is_number(self.scale_rank) and self.scale_rank > 0),
               f"AdapterConfig.scale_rank={self.scale_rank!r}: use a positive number, or None for each "
               "adapter's own rank")
        self.rank_pattern = dict(self.rank_pattern)
        for k, v in self.rank_pattern.items():
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   f"AdapterConfig.rank_pattern[{k!r}]={v!r}: ranks must be integers >= 0")


@dataclass
class ScheduleConfig:
    """Budget schedule ``b(t)`` (``adalora.schedule``), counted in singular values over all SVD adapters.

    ``target_rank`` is the *average* final rank per adapter (``b_T = round(target_rank * n)``);
    ``target_total`` sets ``b_T`` directly and wins when given. ``final_warmup`` is a duration
    (the last ``final_warmup`` steps train with a frozen mask), not a step index.
    """

    target_rank: float | None = 8.0
    target_total: int | None = None
    total_steps: int = 1000
    init_warmup: int = 100
    final_warmup: int = 300
    mask_interval: int = 10
    shape: str = "cubic"

    def __post_init__(self) -> None:
        _check(self.shape in SCHEDULE_SHAPES, f"ScheduleConfig.shape={self.shape!r}: use one of {SCHEDULE_SHAPES}")
        for name in ("total_steps", "mask_interval"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                   f"ScheduleConfig.{name}={v!r}: use a positive integer")
        for name in ("init_warmup", "final_warmup"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                   f"ScheduleConfig.{name}={v!r}: use an integer >= 0")
        _check(self.init_warmup < self.final_step,
               f"ScheduleConfig: init_warmup + final_warmup = {self.init_warmup + self.final_warmup} leaves no "
               f"step to prune in before the final allocation (total_steps = {self.total_steps}): shorten "
               "the warmups or train longer")
        if self.target_total is not None:
            _check(isinstance(self.target_total, int) and not isinstance(self.target_total, bool)
                   and self.target_total >= 0,
                   f"ScheduleConfig.target_total={self.target_total!r}: use an integer >= 0")
        else:
            _check(self.target_rank is not None, "ScheduleConfig: set target_rank (average) or target_total")
        if self.target_rank is not None:
            _check(isinstance(self.target_rank, (int, float)) and not isinstance(self.target_rank, bool)
                   and math.isfinite(self.target_rank) and self.target_rank >= 0,
                   f"ScheduleConfig.target_rank={self.target_rank!r}: use a number >= 0")

    @property
    def final_step(self) -> int:
        """``T − t_f``: the step of the final allocation (steps run ``0 … T−1``).

        With ``final_warmup = 0`` that step would never run, so the last step ``T − 1`` takes the
        final allocation instead.
        """
        # DEVIATION (from the reference codes): with final_warmup = 0 they never force a final
        # allocation, so training ends on whatever budget the last mask step set; here b_T is always
        # reached and finalize() can check it.
        return min(self.total_steps - self.final_warmup, self.total_steps - 1)


@dataclass
class ScoreConfig:
    """Importance score (``adalora.importance``; Eqs. 10-13 of the paper): EMA factors ``beta1``
    (``Ī``) and ``beta2`` (``Ū``), the score ``kind`` and the seed of the random kinds.

    Ablation kinds: ``sensitivity`` (``s = Ī``), ``magnitude`` (``S = |lam_i|``),
    ``random_fixed`` (one random score per singular value, drawn once: a random allocation on
    the same schedule) and ``random_churn`` (new random scores at every mask step, so the kept
    set is reshuffled each time).
    """

    beta1: float = 0.85
    beta2: float = 0.85
    kind: str = "sensitivity_uncertainty"
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.kind != "random", "ScoreConfig.kind='random' is now 'random_churn' (new scores at "
               "every mask step); 'random_fixed' draws one score per singular value once")
        _check(self.kind in SCORE_KINDS, f"ScoreConfig.kind={self.kind!r}: use one of {SCORE_KINDS}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check(_is_number(v) and 0.0 < v < 1.0,
                   f"ScoreConfig.{name}={v!r}: use a value strictly between 0 and 1 (the paper uses 0.85)")
