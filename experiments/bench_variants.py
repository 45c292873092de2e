"""The benchmark's variants: one model each, and one optimizer step that is the experiments
loop's step (``loop.update`` after backward and ``orthogonality_grad_``) without data loading,
gradient clipping and DDP, so that a timed step is what a training run pays for the same work.

Every variant is a random-init BERT-shaped ``BertForSequenceClassification`` (2 labels), or for
the decoder presets a Llama-shaped ``LlamaForCausalLM`` (causal-LM loss on the batch's tokens),
trained with AdamW on one fixed random batch; adapters sit on every linear map of each block.
``lora`` and ``adalora`` run the unfused adapter path; ``*_epilogue``, ``*_merge``, ``*_triton``
and ``*_fused`` are the same adapters with ``fuse="epilogue"``, ``"merge"``, ``"triton"`` and
``"stack"`` (adalora/fused.py)."""
from __future__ import annotations

import contextlib
import time
import types
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

import adalora
from adalora import schedule

from .loop import update
from .model import BLOCK_LINEARS
from .step_graph import StepGraph, orthogonality_beside

TARGETS = BLOCK_LINEARS["bert"]
FUSE_OF = {"fused": "stack", "epilogue": "epilogue", "merge": "merge", "triton": "triton"}   # variant-name suffix -> AdapterConfig.fuse
FLAT = "_flat"   # variant-name suffix: AdaLoRA with AdapterConfig.flat_gates
BANKED = "_banked"   # variant-name suffix: flat_factors (and, for AdaLoRA, flat_gates)
BIG_T = 100_000  # schedule length that keeps the timed AdaLoRA steps inside the budgeting phase


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    step: Callable[[], None]               # one optimizer step, allocator calls included
    state_bytes: Callable[[], int] = lambda: 0   # allocator state (ours: Ī+Ū; peft: ipt+exp_avg_ipt+exp_avg_unc)
    info: dict = field(default_factory=dict)


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def scorer_bytes(alloc) -> int:
    """Bytes of Ī and Ū (the scorer's two flat buffers)."""
    return nbytes([alloc.scorer.ibar, alloc.scorer.ubar])


def targets(cfg) -> list[str]:
    return BLOCK_LINEARS[cfg.arch]


def make_batch(cfg, dev: torch.device, g: torch.Generator) -> dict:
    """One fixed random batch: tokens, a full attention mask, and class labels (BERT) or the
    tokens themselves (causal LM; the model shifts them)."""
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g)
    labels = ids.clone() if cfg.arch == "llama" else torch.randint(0, 2, (cfg.batch,), generator=g)
    batch = {"input_ids": ids.to(dev), "labels": labels.to(dev)}
    if not cfg.step_graph:
        # A captured step passes none: with a full mask transformers asks the host whether it can
        # drop it (a sync, which a capture cannot hold); without one eager transformers runs the
        # same mask-free attention.
        batch["attention_mask"] = torch.ones(cfg.batch, cfg.seq, dtype=torch.long, device=dev)
    return batch


def _build_llama(cfg, dev: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM
    # SmolLM2-135M's settings besides the preset's shape: tied embeddings (Llama-3.2-1B ties its
    # too), RoPE θ = 1e5 (Llama 3.2's 5e5 and its frequency scaling change no kernel's cost).
    lc = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     max_position_embeddings=max(2048, cfg.seq), rope_theta=100000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(cfg.seed)
    with dev:
        return LlamaForCausalLM(lc)


def build_model(cfg, dev: torch.device):
    if cfg.arch == "llama":
        model = _build_llama(cfg, dev)
        if cfg.dtype == "bf16" and cfg.bf16_mode == "weights":
            model = model.to(torch.bfloat16)
        return model.train()
    from transformers import BertConfig, BertForSequenceClassification
    bc = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                    num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                    max_position_embeddings=max(512, cfg.seq), num_labels=2)
    # Set up front: HF fills it in on the first forward, which a compiled model would see as a
    # change of config and recompile for.
    bc.problem_type = "single_label_classification"
    torch.manual_seed(cfg.seed)  # every variant starts from the same weights
    with dev:
        model = BertForSequenceClassification(bc)
    if cfg.dtype == "bf16" and cfg.bf16_mode == "weights":
        model = model.to(torch.bfloat16)
    return model.train()


class PeftAllocator:
    """peft's ``update_and_allocate`` behind the allocator calls of ``loop.update`` (peft scores
    and masks in one call, after the optimizer step, as our default order does)."""
    score_before_step = False

    def __init__(self, peft_model):
        self._model = peft_model

    def update_importance(self, step: int, grads_finite: bool = True) -> None:
        pass

    def mask_to_budget(self, step: int) -> None:
        self._model.base_model.update_and_allocate(step)


def make_step(cfg, dev, model, batch, opt, adapters=None, alloc=None, counter=None):
    amp = cfg.dtype == "bf16" and cfg.bf16_mode == "autocast"
    counter = counter if counter is not None else [1]
    # Each mode gets the penalty's cheaper path, both the same gradient (tests/test_benchmark.py).
    # Eager: orthogonality_grad_ after backward, as the loop does. Compiled: in the graph, where
    # the compiler fuses autograd's join and, under CUDA graphs, the host launches nothing for it.
    orth = adapters is not None and cfg.orth_weight > 0

    def loss_fn():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(**batch).loss
            if orth and cfg.compile:
                loss = loss + cfg.orth_weight * adalora.orthogonality_penalty(adapters)
        return loss
    fn = loss_fn
    if cfg.compile:
        # Dynamo caches compiled code per code object, and every variant's closure shares
        # loss_fn's: each call would first test the other variants' guards, a host cost a
        # one-model training script never pays. A copy of the code object per variant gives
        # each its own cache.
        fn = types.FunctionType(loss_fn.__code__.replace(), loss_fn.__globals__, loss_fn.__name__,
                                loss_fn.__defaults__, loss_fn.__closure__)
        fn = torch.compile(fn, backend=cfg.compile_backend,
                           mode=None if cfg.compile_backend != "inductor" else cfg.compile_mode)
    graphs = cfg.compile and (cfg.compile_mode == "reduce-overhead" or cfg.compile_backend == "cudagraphs")
    if cfg.step_graph:
        return _graphed_step(fn, opt, adapters if orth and not cfg.compile else None, cfg.orth_weight, alloc, counter,
                             capture=dev.type == "cuda")
    if cfg.tail_graph:
        return _tail_graphed_step(fn, opt, adapters if orth and not cfg.compile else None, cfg.orth_weight, alloc,
                                  counter, dev)

    def step(clock: list | None = None):
        """``clock``: a list that gets ``time.perf_counter()`` after each of ``PHASES``."""
        # the timed steps pass no clock and read no time
        mark = (lambda: clock.append(time.perf_counter())) if clock is not None else lambda: None
        t = counter[0]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = fn()
        mark()
        loss.backward()
        mark()
        if orth and not cfg.compile:
            adalora.orthogonality_grad_(adapters, cfg.orth_weight)
        mark()
        # The loop passes the clipping norm's verdict; the benchmark passes True, so neither
        # implementation is charged a finite-check sync.
        update(opt, None, None, alloc, t, finite=True)
        mark()
        opt.zero_grad(set_to_none=True)
        mark()
        counter[0] = t + 1
        return loss.detach()
    return step


# What an eager step's clock marks the end of: update is AdamW, then the allocator's importance
# update and mask step (LoRA: AdamW alone).
PHASES = ("forward", "backward", "penalty", "update", "zero_grad")


GRAPH_WARMUP = 3   # eager steps on a side stream before capture, as torch.cuda.graph asks


@contextlib.contextmanager
def no_mask_built_for_capture():
    """Given no attention mask, transformers 5.17 still builds an explicit all-true one while a
    CUDA stream captures (its "is tracing" test counts capture), which sends SDPA from flash
    attention to its fp32 math path; 5.24 skips it, as eager mode does. Inside this block, a
    capture with no mask to inspect is not counted as tracing, so the captured step runs the eager
    step's attention on either version."""
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    original = masking_utils.is_tracing

    def is_tracing(tensor=None):
        # is_compiling first: Dynamo folds it to True while tracing, and never reaches the CUDA query
        if tensor is None and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
            return False
        return original(tensor)
    masking_utils.is_tracing = is_tracing
    try:
        yield
    finally:
        masking_utils.is_tracing = original


def _graphed_step(fn, opt, orth_adapters, orth_weight, alloc, counter, capture=True):
    """The step above captured whole as a CUDA graph on its first call (after ``GRAPH_WARMUP``
    eager steps), then replayed: the host launches one graph a step. The body is ``loop.update``'s
    order with the allocator's device form: ``update_importance``, then on mask steps
    ``mask_on_device`` with the step counter on the device (one graph serves every budget); after
    the final allocation, ``mask_to_budget``'s frozen-mask step, which is capturable as it is. As
    in the loop's captured step, a schedule that masks every k steps gets a second graph without
    the mask step's kernels for the steps between (both graphs in one memory pool: they never run
    at once). Returns the loss of the latest replay (a static tensor: read or clone it before the
    next). ``capture=False`` runs the same bodies uncaptured, step by step: the CPU tests' view of
    what the GPU captures."""
    device_step = None
    if alloc is not None and not alloc.final_done:
        device_step = torch.full((), counter[0], dtype=torch.long, device=opt.param_groups[0]["params"][0].device)

    # γ∇R reads P and Q alone: captured, its kernels run on a stream of their own beside the
    # forward and backward, and only its adds into .grad wait for backward (the loop's order).
    beside = torch.cuda.Stream() if capture and orth_adapters is not None else None

    def masks(step: int) -> bool:
        return device_step is not None and schedule.is_mask_step(step, alloc.schedule)

    def body(masking: bool):
        add_orth = None if orth_adapters is None else orthogonality_beside(beside, orth_adapters, orth_weight)
        loss = fn()
        loss.backward()
        if add_orth is not None:
            add_orth()
        opt.step()
        if device_step is not None:
            alloc.update_importance(counter[0], grads_finite=True)
            if masking:
                alloc.mask_on_device(device_step)
            device_step.add_(1)
        elif alloc is not None:
            alloc.mask_to_budget(counter[0])
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    graphs = {}    # masking -> (graph, static loss)

    def step():
        if not capture:
            loss = body(masks(counter[0]))
            counter[0] += 1
            return loss
        if not graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # warm-up inside the block too: a compiled forward then sees one is_tracing throughout.
            # It runs the mask step's kernels every step, so that either graph captures calls
            # that have run before (mask_on_device builds its tables on the first); off a mask
            # step they leave the masks and lam as they are.
            with no_mask_built_for_capture():
                with torch.cuda.stream(side):
                    for _ in range(GRAPH_WARMUP):
                        body(device_step is not None)
                        counter[0] += 1
                torch.cuda.current_stream().wait_stream(side)
                # every graph the schedule will replay, now: a capture inside the timed steps
                # would count its own time (a capture runs nothing; the device step sets b(t))
                every_k = device_step is not None and alloc.schedule.mask_interval > 1
                for masking in {True, False} if every_k else {masks(counter[0])}:
                    graph = torch.cuda.CUDAGraph()
                    pool = next(iter(graphs.values()))[0].pool() if graphs else None
                    with torch.cuda.graph(graph, pool=pool):
                        graphs[masking] = (graph, body(masking))
        graph, loss = graphs[masks(counter[0])]
        graph.replay()
        counter[0] += 1
        return loss
    return step


def _tail_graphed_step(fn, opt, orth_adapters, orth_weight, alloc, counter, dev):
    """The loop's ``trainer.tail_graph`` step: forward and backward eager, then γ∇R and the update
    as the loop's tail graphs (``StepGraph(tail=...)``, captured on CUDA after its warm-up steps,
    uncaptured on the CPU). No clipping, as in the other modes; the values the graphs keep on the
    device are read back whenever their buffer fills, as the loop reads them at its logging.
    Of the clock's ``PHASES``, ``update`` holds all that follows backward (the copy into the
    graphs' buffers, the replays, which run the penalty, and unsetting ``.grad``); ``penalty``
    and ``zero_grad`` are empty."""
    state = {"mark": lambda: None}

    def grads_of(_batch):
        state["loss"] = fn()
        state["mark"]()
        state["loss"].backward()
        state["mark"]()
        return state["loss"].detach()

    def finish():
        orth = (adalora.orthogonality_grad_(orth_adapters, orth_weight) if orth_adapters is not None
                else torch.zeros((), device=dev))
        return orth, torch.zeros((), device=dev)

    graph = StepGraph(None, lambda step, finite: update(opt, None, None, alloc, step, finite), opt,
                      types.SimpleNamespace(step=lambda: None), alloc, dev, capture=dev.type == "cuda",
                      tail=(grads_of, finish))

    def step(clock: list | None = None):
        mark = (lambda: clock.append(time.perf_counter())) if clock is not None else lambda: None
        state["mark"] = mark
        graph.grads(None)
        mark()                                  # penalty: inside the replays below
        graph.update(counter[0])
        counter[0] += 1
        if graph.full:
            graph.read()
        mark()
        mark()                                  # zero_grad: done by update
        return state["loss"].detach()
    return step


def make_optimizer(cfg, model):
    # The fastest stock AdamW per device, the same for every variant: one fused kernel on CUDA,
    # multi-tensor (foreach) on the CPU, whose default is a Python loop over parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    dev = params[0].device.type
    # A captured step keeps AdamW's step count on the device (capturable). The tail graphs skip a
    # non-finite step through fused AdamW's found_inf, so they take the fused kernel on the CPU too.
    fused = dev == "cuda" or cfg.tail_graph
    return torch.optim.AdamW(params, lr=cfg.lr, fused=fused, foreach=not fused,
                             capturable=(cfg.step_graph or cfg.tail_graph) and dev == "cuda")


def build_variant(name: str, cfg, dev, batch, final_ranks: dict) -> Variant:
    model = build_model(cfg, dev)
    decoder = cfg.arch == "llama"
    if name in ("floor", "full"):
        for p in model.parameters():
            p.requires_grad_(name == "full")
        if name == "floor":
            # Input grads flow through every layer, but no weight of the backbone gets a gradient
            # (a norm scale at the bottom, hidden-size elements, is the entry point). The
            # decoder has no head to train: its LM head is the frozen, tied embedding.
            if decoder:
                model.model.layers[0].input_layernorm.weight.requires_grad_(True)
            else:
                model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
                model.classifier.requires_grad_(True)
        opt = make_optimizer(cfg, model)
        return Variant(name, model, make_step(cfg, dev, model, batch, opt))
    if name.startswith("peft_"):
        return _build_peft(name, cfg, dev, model, batch)
    svd = name.startswith("adalora")
    # the same variant with flat gates, or flat gates and factors (adalora/gate_bank.py)
    suffix = next((x for x in (FLAT, BANKED) if name.endswith(x)), "")
    name = name.removesuffix(suffix) if suffix else name
    acfg = adalora.AdapterConfig(method="adalora" if svd else "lora", targets=targets(cfg),
                                 init_rank=cfg.init_rank if svd else cfg.lora_rank, alpha=cfg.alpha,
                                 rank_pattern=final_ranks if name == "lora_final" else {},
                                 fuse=FUSE_OF.get(name.rsplit("_", 1)[-1], "none"), flat_gates=svd and bool(suffix),
                                 flat_factors=suffix == BANKED)
    adapters = adalora.inject(model, acfg)
    adalora.mark_only_adapters_trainable(model, extra=() if decoder else ("classifier",))
    opt = make_optimizer(cfg, model)
    if not svd:
        return Variant(name + suffix, model, make_step(cfg, dev, model, batch, opt))
    compact = name == "adalora_compact"
    sched = adalora.ScheduleConfig(target_rank=cfg.target_rank, total_steps=BIG_T, init_warmup=0,
                                   final_warmup=BIG_T - 3 if compact else 1000,
                                   mask_interval=10 if name == "adalora_every10" else 1)
    alloc = adalora.RankAllocator(adapters, sched)
    counter = [1]
    v = Variant(name + suffix, model, None, lambda: scorer_bytes(alloc))
    if compact:
        # Train through the final allocation (step 3) eagerly, shrink, and only then build the timed step.
        eager = replace(cfg, compile=False, step_graph=False, tail_graph=False)
        step = make_step(eager, dev, model, batch, opt, adapters, alloc, counter=counter)
        while not alloc.final_done:
            step()
        alloc.compact(opt)
        v.info["final_ranks"] = alloc.ranks()
        final_ranks.update(v.info["final_ranks"])
    v.step = make_step(cfg, dev, model, batch, opt, adapters, alloc, counter=counter)
    return v


def _build_peft(name, cfg, dev, model, batch) -> Variant:
    import peft
    task = "CAUSAL_LM" if cfg.arch == "llama" else "SEQ_CLS"
    if name == "peft_lora":
        pcfg = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.alpha, target_modules=targets(cfg), task_type=task)
    else:
        pcfg = peft.AdaLoraConfig(init_r=cfg.init_rank, target_r=int(cfg.target_rank), lora_alpha=cfg.alpha,
                                  target_modules=targets(cfg), task_type=task, tinit=0, tfinal=1000, deltaT=1,
                                  total_step=BIG_T, orth_reg_weight=cfg.orth_weight)
    # Keep peft's adapters in the model dtype (ours are), not upcast to fp32.
    model = peft.get_peft_model(model, pcfg, autocast_adapter_dtype=False)
    opt = make_optimizer(cfg, model)
    if name == "peft_lora":
        return Variant(name, model, make_step(cfg, dev, model, batch, opt))
    ra = model.base_model.rankallocator
    step = make_step(cfg, dev, model, batch, opt, alloc=PeftAllocator(model))
    return Variant(name, model, step,
                   lambda: nbytes([*ra.ipt.values(), *ra.exp_avg_ipt.values(), *ra.exp_avg_unc.values()]))


def have_peft() -> bool:
    try:
        import peft  # noqa: F401
        return True
    except ImportError:
        return False
