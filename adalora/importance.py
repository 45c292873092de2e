"""Importance of singular values (paper Eqs. 9-13), smoothed over steps.

For every element ``w`` of ``P``, ``lam``, ``Q``:
``I = |w · ∂L/∂w|``; ``Ī ← β1 Ī + (1−β1) I``; ``Ū ← β2 Ū + (1−β2) |I − Ī|``; ``s = Ī · Ū``.
Triplet score of singular value ``i``: ``S_i = s(lam_i) + mean_j s(P_ji) + mean_j s(Q_ij)``.

The update runs on flat buffers, a handful of kernels per step whatever the number of adapters;
the only state is ``Ī`` and ``Ū`` (``I`` and the gathered weights/gradients are transient).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from . import alloc_kernels, gate_bank, launch_gate
from .config import ScoreConfig
from .layers import SVDLinear, fast_param


def triplet_scores(s_P: torch.Tensor, s_lam: torch.Tensor, s_Q: torch.Tensor) -> torch.Tensor:
    """Eq. 9: ``(..., d_out, r), (..., r), (..., r, d_in) -> (..., r)`` (batched over leading dims).

    Summed as ``s_lam + (mean s_Q + mean s_P)``, the order peft uses, so ties resolve alike.
    """
    return s_lam + (s_Q.mean(dim=-1) + s_P.mean(dim=-2))


class _Layout:
    """Where each adapter's ``P``, ``lam``, ``Q`` sit in the flat state buffers.

    The buffer is a run of blocks, each a matrix with one row per singular value (``P`` as
    ``Pᵀ``, a gate as a row of one):

    - a bank (adalora/gate_bank.py) all of whose adapters are scored: its parameter as it is
      stored, so a step reads it with one copy instead of a gather;
    - otherwise, per shape ``(d_out, r, d_in)`` and kind, the group's ``[X_1; ...; X_n]``,
      joined with one ``cat`` (or ``index_select`` of a bank it shares with adapters not scored).

    Every adapter's tensor is one contiguous chunk of the buffer (``start``), and the work per step
    is a few kernels per block, not per adapter. Scores (Eq. 9) read the blocks' row means and
    gather them into layer order with three index vectors.
    """

    def __init__(self, layers: list[SVDLinear]):
        self.ranks = tuple(layer.rank for layer in layers)
        index = {id(layer): k for k, layer in enumerate(layers)}
        self.whole = []                           # banks read as stored: all their adapters are scored
        for a in ("P", "lam", "Q"):
            for bank in {id(b): b for b in (gate_bank.bank_of(l, a) for l in layers) if b is not None}.values():
                if all(id(l) in index for l in bank.layers):
                    self.whole.append(bank)
        in_whole = {(index[id(l)], bank.attr) for bank in self.whole for l in bank.layers}
        self.start: dict[tuple[int, str], int] = {}     # (layer index, attr) -> first element
        self.blocks: list[tuple[str, int, int, int]] = []   # (attr, offset, rows, width)
        offset = 0
        for bank in self.whole:
            rows, width = bank.param.shape[0], 1 if bank.param.dim() == 1 else bank.param.shape[1]
            self.blocks.append((bank.attr, offset, rows, width))
            for l, o in zip(bank.layers, bank.offsets):
                self.start[(index[id(l)], bank.attr)] = offset + o * width
            offset += rows * width
        self.whole_numel = offset
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for k, layer in enumerate(layers):
            groups[(layer.out_features, layer.rank, layer.in_features)].append(k)
        self.groups = []                          # (kind, layer indices, width, offset, bank and rows or None)
        for (d_out, r, d_in), ks in groups.items():
            for a, width in (("P", d_out), ("lam", 1), ("Q", d_in)):
                if (ks[0], a) in in_whole:
                    continue
                bank = gate_bank.bank_of(layers[ks[0]], a)
                shared = bank is not None and all(gate_bank.bank_of(layers[k], a) is bank for k in ks)
                src = (bank, bank.rows_of([layers[k] for k in ks])) if shared else None
                self.groups.append((a, ks, width, offset, src))
                self.blocks.append((a, offset, len(ks) * r, width))
                for j, k in enumerate(ks):
                    self.start[(k, a)] = offset + j * r * width
                offset += len(ks) * r * width
        self.numel = offset
        self.banks = self.whole + [src[0] for *_, src in self.groups if src is not None]
        # the own parameters a step reads, in group order (the rest come from banks)
        self.own = [(k, a) for a, ks, _, _, src in self.groups if src is None for k in ks]
        # Eq. 9 in layer order: s(lam_i) read at its element, and the row means of P and Q (one
        # vector, blocks in order) at their rows
        mean_blocks = [b for b in self.blocks if b[0] != "lam"]
        row0, first = 0, {}
        for a, off, rows, width in mean_blocks:
            first[off] = row0
            row0 += rows
        self.mean_blocks = mean_blocks
        block_of = {}                                 # element offset of a chunk -> its mean row
        for a, off, rows, width in mean_blocks:
            for i in range(rows):
                block_of[off + i * width] = first[off] + i
        lam_at, p_row, q_row = [], [], []
        for k, r in enumerate(self.ranks):
            for i in range(r):
                lam_at.append(self.start[(k, "lam")] + i)
                p_row.append(block_of[self.start[(k, "P")] + i * layers[k].out_features])
                q_row.append(block_of[self.start[(k, "Q")] + i * layers[k].in_features])
        self.lam_at, self.p_row, self.q_row = (torch.tensor(x, dtype=torch.long) for x in (lam_at, p_row, q_row))
        # The kernels' path (adalora/alloc_kernels.py), where every block is a whole bank: one
        # mean per row of every block, λ's included (a row of one), and Eq. 9's three reads of it.
        self.rows_total = sum(rows for _, _, rows, _ in self.blocks)
        self.row_means: torch.Tensor | None = None    # (rows_total,) fp32, made outside any capture
        self.row_index: tuple | None = None           # (lam, q, p) rows of each singular value
        if not self.groups:
            first, row0 = {}, 0
            for _, off, rows, _ in self.blocks:
                first[off] = row0
                row0 += rows
            row_of = {off + i * width: first[off] + i for _, off, rows, width in self.blocks for i in range(rows)}
            widths = {"lam": lambda layer: 1, "P": lambda layer: layer.out_features, "Q": lambda layer: layer.in_features}
            self.row_index = tuple(
                torch.tensor([row_of[self.start[(k, a)] + i * widths[a](layers[k])]
                              for k, r in enumerate(self.ranks) for i in range(r)], dtype=torch.long)
                for a in ("lam", "Q", "P"))

    def tensors(self, layers: list[SVDLinear]) -> list[torch.Tensor]:
        """The own parameters a step reads, in ``own`` order."""
        # _parameters, not getattr: this runs every step for every parameter, and under CUDA
        # graphs the step waits on host time such as nn.Module.__getattr__'s lookup.
        return [fast_param(layers[k], a) for k, a in self.own]

    def flatten(self, tensors: list[torch.Tensor], dtype: torch.dtype, ref: torch.Tensor,
                grad: bool = False) -> torch.Tensor:
        """One flat buffer in ``dtype``: the whole banks (their gradients with ``grad``) with one
        ``cat``, then each group's block with one ``cat`` of ``tensors`` (``own`` order) or one
        ``index_select`` of its bank, written straight into its slice of the buffer; then one
        cast. ``ref``: any of the adapters' leaves (device and dtype). ``P`` blocks go in as
        ``Pᵀ (r, d_out)``, the layout they are stored in (column-major), so the scores' mean
        over ``d_out`` runs along memory."""
        flat = ref.new_empty(self.numel)
        if self.whole:
            srcs = [(b.param.grad if grad else b.param).reshape(-1) for b in self.whole]
            torch.cat(srcs, out=flat[:self.whole_numel])
        eager = _eager(flat)
        i = 0
        for g, (a, ks, width, off, src) in enumerate(self.groups):
            out = flat[off:off + len(ks) * (self.ranks[ks[0]] * width)]
            out = out if a == "lam" else out.view(-1, width)
            if src is not None:
                # a bank shared with adapters not scored (else it is read whole above): its
                # rows of the group, which are never all of it in order
                bank, index = src
                rows = bank.param.grad if grad else bank.param
                if index.device != rows.device:
                    index = index.to(rows.device)
                    self.groups[g] = (a, ks, width, off, (bank, index))
                torch.index_select(rows, 0, index, out=out)
                continue
            parts = tensors[i:i + len(ks)]
            i += len(ks)
            if a != "P":
                torch.cat(parts, out=out)
            # Eager, the P blocks are cat along their columns into the transposed view of
            # their slice: one dispatch, where a transpose per block is a dispatch each and
            # the eager step waits on the host. Captured or compiled, where the host pays
            # nothing and only the kernels count, the transposes hand cat contiguous rows,
            # its faster kernel.
            elif eager:
                torch.cat(parts, dim=1, out=out.t())
            else:
                torch.cat([t.t() for t in parts], out=out)
        return flat.to(dtype)

    def scores(self, s: torch.Tensor) -> torch.Tensor:
        """Eq. 9 for every singular value, layer order, from the per-element scores ``s`` (this
        layout): ``s(lam_i) + (mean_j s(Q_ij) + mean_j s(P_ji))``, the sum in ``triplet_scores``'s
        order."""
        if self.lam_at.device != s.device:     # once, not a host-to-device copy per mask step
            self.lam_at, self.p_row, self.q_row = (t.to(s.device) for t in (self.lam_at, self.p_row, self.q_row))
        means = torch.cat([s[off:off + rows * width].view(rows, width).mean(1)     # P and Q blocks: two or more
                           for _, off, rows, width in self.mean_blocks])
        return s.index_select(0, self.lam_at) + (means.index_select(0, self.q_row) + means.index_select(0, self.p_row))


def _eager(t: torch.Tensor) -> bool:
    """Whether ops on ``t`` run as they are dispatched: not traced by ``torch.compile``, not
    captured into a CUDA graph."""
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


class ImportanceScorer:
    """Holds the EMAs ``Ī``, ``Ū`` for the SVD adapters given, as two flat buffers.

    ``kind``: ``sensitivity_uncertainty`` (``s = Ī·Ū``, default), ``sensitivity`` (``s = Ī``),
    ``magnitude`` (``S = |lam_i|``, no state), ``random_fixed`` (uniform scores drawn once from
    ``seed``: the same at every call) or ``random_churn`` (fresh uniform scores per call, seeded
    by ``(seed, step)`` so that a resumed run draws the same numbers).
    State is fp32 for bf16/fp16 adapters, else the adapters' dtype.
    """

    def __init__(self, layers: list[SVDLinear], cfg: ScoreConfig):
        self.layers = layers
        self.cfg = cfg
        self.uses_grad = cfg.kind in ("sensitivity_uncertainty", "sensitivity")
        self.ibar: torch.Tensor | None = None     # (Σ numel of P, lam, Q,) in layout order
        self.ubar: torch.Tensor | None = None
        self.updates = 0
        self.skipped = 0
        self._layout_cache: _Layout | None = None
        self._fresh: _Layout | None = None        # the layout whose row_means the last update left

    def _layout(self) -> _Layout:
        # Rebuilt only when ranks change (compaction, loading a pruned adapter).
        if self._layout_cache is None or self._layout_cache.ranks != tuple(l.rank for l in self.layers):
            self._layout_cache = _Layout(self.layers)
        return self._layout_cache

    def _grads(self, layout: _Layout, params: list[torch.Tensor]) -> list[torch.Tensor]:
        # a banked tensor's gradient is read from its bank's, in flatten
        for bank in layout.banks:
            if bank.param.grad is None:
                raise RuntimeError(f"no gradient for the flat parameter {bank.name}: call update_importance "
                                   "after loss.backward() and before optimizer.zero_grad()")
        grads = [p.grad for p in params]
        if all(g is not None for g in grads):
            return grads
        for j, ((k, attr), p) in enumerate(zip(layout.own, params)):
            if p.grad is None and p.numel() == 0:
                grads[j] = p                        # a rank-0 adapter: forward skips it, nothing to score
            elif p.grad is None:
                raise RuntimeError(
                    f"no gradient for {attr} of SVD adapter #{k} ({self.layers[k].extra_repr()}): "
                    "call update_importance after loss.backward() and before optimizer.zero_grad(), "
                    "and keep adapter parameters trainable (mark_only_adapters_trainable)")
        return grads

    @torch.no_grad()
    def update(self, grads_finite: bool | None = None) -> bool:
        """One EMA step from the current ``.grad`` of every scored parameter.

        Returns False (and counts a skip) when a gradient is non-finite. ``grads_finite`` lets a
        caller that already knows (an AMP scaler, a checked loss) spare the one host sync of the check.
        """
        if not self.uses_grad:
            return True
        layout = self._layout()
        params = layout.tensors(self.layers)
        grads = self._grads(layout, params)
        ref = gate_bank.leaf(self.layers[0], "P")
        state_dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        if grads_finite is True and self._update_by_kernels(layout, ref, state_dtype):
            self.updates += 1
            return True
        # Two gathers into flat buffers, then everything is a handful of kernels whatever the
        # number of adapters; |w · g| is formed in the state dtype (fp32 for bf16 adapters).
        w = layout.flatten(params, state_dtype, ref)                    # under no_grad: no detach needed
        ipt = layout.flatten(grads, state_dtype, ref, grad=True).mul_(w).abs_()   # I = |w · g|
        if grads_finite is None:
            grads_finite = bool(torch.isfinite(ipt.sum()))        # the step's one host sync
        if not grads_finite:
            self.skipped += 1
            return False
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        if self.ibar is None:
            self.ibar = torch.zeros_like(ipt)
            if self.cfg.kind == "sensitivity_uncertainty":
                self.ubar = torch.zeros_like(ipt)
        self._fresh = None
        self.ibar.mul_(b1).add_(ipt, alpha=1 - b1)               # Ī ← β1 Ī + (1−β1) I
        if self.ubar is not None:
            ipt.sub_(self.ibar).abs_()                            # |I − Ī| with the updated Ī
            self.ubar.mul_(b2).add_(ipt, alpha=1 - b2)            # Ū ← β2 Ū + (1−β2) |I − Ī|
        self.updates += 1
        return True

    def _update_by_kernels(self, layout: _Layout, ref: torch.Tensor, state_dtype: torch.dtype) -> bool:
        """``update``'s EMA step as one kernel per bank (adalora/alloc_kernels.py), each also
        leaving its rows' mean scores for ``flat_scores``: where every scored tensor is a whole
        bank, the state is fp32 and ``alloc_kernels.ready`` (captured steps). False: the ops run
        (the state may have been allocated, as they would)."""
        if layout.row_index is None or state_dtype != torch.float32 or not alloc_kernels.available(ref):
            return False
        if launch_gate.capturing() and (self.ibar is None or layout.row_means is None):
            return False                     # their first allocation stays outside the graph's pool
        if self.ibar is None:
            self.ibar = ref.new_zeros(layout.numel, dtype=state_dtype)
            if self.cfg.kind == "sensitivity_uncertainty":
                self.ubar = torch.zeros_like(self.ibar)
        if layout.row_means is None or layout.row_means.device != ref.device:
            layout.row_means = ref.new_empty(layout.rows_total, dtype=torch.float32)
            layout.row_index = tuple(t.to(ref.device) for t in layout.row_index)
        launches, row = [], 0
        for bank, (_, off, rows, _) in zip(layout.whole, layout.blocks):
            w, g = bank.param.detach(), bank.param.grad
            n = w.numel()
            if not (w.is_contiguous() and g.is_contiguous()):
                return False
            ubar = None if self.ubar is None else self.ubar[off:off + n]
            launches.append((w, g, self.ibar[off:off + n], ubar, layout.row_means[row:row + rows]))
            row += rows
        if not alloc_kernels.ready(ref, *(alloc_kernels.ema_signature(*a) for a in launches)):
            return False                     # the ops below: an eager step, or a launch not compiled
        for args in launches:
            alloc_kernels.ema_rows_(*args, self.cfg.beta1, self.cfg.beta2)
        self._fresh = layout
        return True

    @torch.no_grad()
    def flat_scores(self, step: int = 0) -> torch.Tensor:
        """Triplet scores of all singular values, layer order then index: ``(Σ r_k,)``."""
        if self.cfg.kind == "magnitude":
            return torch.cat([layer.lam.detach().abs().float() for layer in self.layers])
        device = self.layers[0].lam.device
        if self.cfg.kind in ("random_fixed", "random_churn"):
            # random_fixed: one draw per singular value (ranks only change after the final
            # allocation, so the positions are stable while masking); random_churn: per step.
            draw = self.cfg.seed * 1_000_003 + (step if self.cfg.kind == "random_churn" else 0)
            g = torch.Generator().manual_seed(draw)
            return torch.rand(sum(layer.rank for layer in self.layers), generator=g).to(device)
        layout = self._layout()
        if self.ibar is None:
            # Never updated (every gradient so far non-finite): every triplet scores zero.
            return torch.zeros(sum(layout.ranks), device=device)
        if self._fresh is layout and alloc_kernels.ready(
                layout.row_means, alloc_kernels.triplets_signature(layout.row_means, layout.row_index[0])):
            return alloc_kernels.triplets(layout.row_means, *layout.row_index)   # the last update's means
        s = self.ibar if self.ubar is None else self.ibar * self.ubar
        return layout.scores(s)

    def scores(self, step: int = 0) -> list[torch.Tensor]:
        """Triplet scores ``S_k (r_k,)`` per layer, in layer order."""
        return list(self.flat_scores(step).split([layer.rank for layer in self.layers]))

    def free(self) -> None:
        """Drop the EMAs (after the final allocation nothing is scored any more)."""
        self.ibar = self.ubar = self._fresh = None

    def _per_parameter(self, flat: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The flat buffer as one tensor per parameter, layer order ``[P_1, lam_1, Q_1, P_2, ...]``."""
        if flat is None:
            return None
        layout = self._layout()
        out = []
        for k, layer in enumerate(self.layers):
            for a in ("P", "lam", "Q"):
                shape = getattr(layer, a).shape
                piece = flat[layout.start[(k, a)]:][:shape.numel()]
                # P is stored as Pᵀ: the clone of its transpose keeps P's own (column-major) layout
                out.append((piece.view(shape[::-1]).t() if a == "P" else piece.view(shape)).clone())
        return out

    def state_dict(self) -> dict:
        return {"ibar": self._per_parameter(self.ibar), "ubar": self._per_parameter(self.ubar),
                "updates": self.updates, "skipped": self.skipped}

    def load_state_dict(self, sd: dict) -> None:
        """Accepts per-parameter lists in layer order ``[P_1, lam_1, Q_1, ...]`` (as ``state_dict`` gives)."""
        layout = self._layout()

        def flat(ts):
            if ts is None:
                return None
            # every tensor is one chunk of the buffer: joined in the order of their starts
            keys = sorted(layout.start, key=layout.start.get)
            by_key = {(k, a): ts[3 * k + i] for k in range(len(self.layers)) for i, a in enumerate(("P", "lam", "Q"))}
            return torch.cat([(by_key[key].t() if key[1] == "P" else by_key[key]).reshape(-1) for key in keys])

        self.ibar, self.ubar = flat(sd["ibar"]), flat(sd["ubar"])
        self._fresh = None
        self.updates, self.skipped = int(sd["updates"]), int(sd["skipped"])
