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

from . import gate_bank
from .config import ScoreConfig
from .layers import SVDLinear, fast_param


def triplet_scores(s_P: torch.Tensor, s_lam: torch.Tensor, s_Q: torch.Tensor) -> torch.Tensor:
    """Eq. 9: ``(..., d_out, r), (..., r), (..., r, d_in) -> (..., r)`` (batched over leading dims).

    Summed as ``s_lam + (mean s_Q + mean s_P)``, the order peft uses, so ties resolve alike.
    """
    return s_lam + (s_Q.mean(dim=-1) + s_P.mean(dim=-2))


class _Layout:
    """Where each adapter's ``P``, ``lam``, ``Q`` sit in the flat state buffers.

    Adapters of one shape ``(d_out, r, d_in)`` form a group laid out as ``[P_1ᵀ..P_nᵀ, lam_1..lam_n,
    Q_1..Q_n]``, so a group's scores are three batched reductions over views: the work per step
    is a few kernels per distinct shape, not per adapter.
    """

    def __init__(self, layers: list[SVDLinear]):
        self.ranks = tuple(layer.rank for layer in layers)
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for k, layer in enumerate(layers):
            groups[(layer.out_features, layer.rank, layer.in_features)].append(k)
        self.groups = []                          # (layer indices, d_out, r, d_in, offset)
        self.order: list[tuple[int, str]] = []    # (layer index, attr) in buffer order
        offset = 0
        for (d_out, r, d_in), ks in groups.items():
            self.groups.append((ks, d_out, r, d_in, offset))
            offset += len(ks) * r * (d_out + 1 + d_in)
            self.order += [(k, a) for a in ("P", "lam", "Q") for k in ks]
        self.numel = offset
        # scores come out group by group; this permutation puts them back in layer order
        pos = {}
        i = 0
        for ks, _, r, _, _ in self.groups:
            for k in ks:
                pos[k] = range(i, i + r)
                i += r
        self.perm = torch.tensor([j for k in range(len(layers)) for j in pos[k]], dtype=torch.long)
        # Flat parameters (adalora/gate_bank.py): a group's block of a banked kind is one
        # index_select of its bank (or a copy of all of it), not a cat of a view per adapter.
        self.banked: list[dict] = []             # per group: kind -> (bank, row index or None)
        for ks, _, r, _, _ in self.groups:
            per_kind = {}
            for a in ("P", "lam", "Q"):
                banks = {id(gate_bank.bank_of(layers[k], a)) for k in ks}
                bank = gate_bank.bank_of(layers[ks[0]], a)
                if bank is not None and len(banks) == 1:
                    per_kind[a] = (bank, bank.rows_of([layers[k] for k in ks]))
            self.banked.append(per_kind)
        self.banks = list({id(b): b for g in self.banked for b, _ in g.values()}.values())
        in_bank = {(k, a) for (ks, *_), g in zip(self.groups, self.banked) for a in g for k in ks}
        self._own = [key not in in_bank for key in self.order]

    def tensors(self, layers: list[SVDLinear]) -> list[torch.Tensor | None]:
        """The parameters in buffer order; None for one that lives in a bank."""
        # _parameters, not getattr: this runs every step for every parameter, and under CUDA
        # graphs the step waits on host time such as nn.Module.__getattr__'s lookup.
        return [fast_param(layers[k], a) if own else None for (k, a), own in zip(self.order, self._own)]

    def flatten(self, tensors: list[torch.Tensor | None], dtype: torch.dtype, ref: torch.Tensor,
                grad: bool = False) -> torch.Tensor:
        """``tensors`` (in ``order``; a banked one None, read from its bank, or from its bank's
        gradient with ``grad``) as one flat buffer in ``dtype``: one ``cat`` (or ``index_select``)
        per group and kind, each written straight into its slice of the buffer, instead of a
        reshape per tensor and a cat of the pieces; then one cast. ``ref``: any of the adapters'
        leaves (device and dtype). ``P`` blocks go in as ``Pᵀ (r, d_out)``, the layout they are
        stored in (column-major), so the scores' mean over ``d_out`` runs along memory."""
        flat = ref.new_empty(self.numel)
        eager = _eager(flat)
        i = 0
        for (ks, d_out, r, d_in, off), banked in zip(self.groups, self.banked):
            n = len(ks)
            blocks = {"P": flat[off:off + n * r * d_out].view(n * r, d_out)}      # [P_1ᵀ; ...; P_nᵀ]
            off += n * r * d_out
            blocks["lam"] = flat[off:off + n * r]
            off += n * r
            blocks["Q"] = flat[off:off + n * r * d_in].view(n * r, d_in)
            off += n * r * d_in
            for j, a in enumerate(("P", "lam", "Q")):
                out, parts = blocks[a], tensors[i + j * n:i + (j + 1) * n]
                if a in banked:
                    bank, index = banked[a]
                    src = bank.param.grad if grad else bank.param
                    if index is None:
                        out.copy_(src)
                    else:
                        if index.device != src.device:
                            index = index.to(src.device)
                            banked[a] = (bank, index)
                        torch.index_select(src, 0, index, out=out)
                elif a != "P":
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
            i += 3 * n
        return flat.to(dtype)


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

    def _layout(self) -> _Layout:
        # Rebuilt only when ranks change (compaction, loading a pruned adapter).
        if self._layout_cache is None or self._layout_cache.ranks != tuple(l.rank for l in self.layers):
            self._layout_cache = _Layout(self.layers)
        return self._layout_cache

    def _grads(self, layout: _Layout, params: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        # a banked tensor (None here) takes its gradient from the bank's, in flatten
        grads = [p.grad if p is not None else None for p in params]
        for bank in layout.banks:
            if bank.param.grad is None:
                raise RuntimeError(f"no gradient for the flat parameter {bank.name}: call update_importance "
                                   "after loss.backward() and before optimizer.zero_grad()")
        if all(g is not None or p is None for g, p in zip(grads, params)):
            return grads
        grads = []
        for (k, attr), p in zip(layout.order, params):
            if p is None:
                grads.append(None)
                continue
            if p.grad is None and p.numel() == 0:
                grads.append(p)                     # a rank-0 adapter: forward skips it, nothing to score
                continue
            if p.grad is None:
                raise RuntimeError(
                    f"no gradient for {attr} of SVD adapter #{k} ({self.layers[k].extra_repr()}): "
                    "call update_importance after loss.backward() and before optimizer.zero_grad(), "
                    "and keep adapter parameters trainable (mark_only_adapters_trainable)")
            grads.append(p.grad)
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
        self.ibar.mul_(b1).add_(ipt, alpha=1 - b1)               # Ī ← β1 Ī + (1−β1) I
        if self.ubar is not None:
            ipt.sub_(self.ibar).abs_()                            # |I − Ī| with the updated Ī
            self.ubar.mul_(b2).add_(ipt, alpha=1 - b2)            # Ū ← β2 Ū + (1−β2) |I − Ī|
        self.updates += 1
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
            # Never updated (e.g. masking before any backward): every triplet scores zero.
            return torch.zeros(sum(layout.ranks), device=device)
        s = self.ibar if self.ubar is None else self.ibar * self.ubar
        per_group = []
        for ks, d_out, r, d_in, off in layout.groups:
            n = len(ks)
            sP = s[off:off + n * d_out * r].view(n, r, d_out).transpose(1, 2)   # stored as Pᵀ
            off += n * d_out * r
            sl = s[off:off + n * r].view(n, r)
            off += n * r
            sQ = s[off:off + n * r * d_in].view(n, r, d_in)
            per_group.append(triplet_scores(sP, sl, sQ).reshape(-1))
        if layout.perm.device != s.device:
            layout.perm = layout.perm.to(s.device)     # once, not a host-to-device copy per mask step
        return torch.cat(per_group)[layout.perm]

    def scores(self, step: int = 0) -> list[torch.Tensor]:
        """Triplet scores ``S_k (r_k,)`` per layer, in layer order."""
        return list(self.flat_scores(step).split([layer.rank for layer in self.layers]))

    def free(self) -> None:
        """Drop the EMAs (after the final allocation nothing is scored any more)."""
        self.ibar = self.ubar = None

    def _per_parameter(self, flat: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The flat buffer as one tensor per parameter, layer order ``[P_1, lam_1, Q_1, P_2, ...]``."""
        if flat is None:
            return None
        layout = self._layout()
        sizes = [fast_param(self.layers[k], a).numel() for k, a in layout.order]
        pieces = dict(zip(layout.order, flat.split(sizes)))
        out = []
        for k in range(len(self.layers)):
            for a in ("P", "lam", "Q"):
                shape = getattr(self.layers[k], a).shape
                # P is stored as Pᵀ: the clone of its transpose keeps P's own (column-major) layout
                piece = pieces[(k, a)].view(shape[::-1]).t() if a == "P" else pieces[(k, a)].view(shape)
                out.append(piece.clone())
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
            by_key = {(k, a): ts[3 * k + i] for k in range(len(self.layers)) for i, a in enumerate(("P", "lam", "Q"))}
            return torch.cat([(by_key[key].t() if key[1] == "P" else by_key[key]).reshape(-1)
                              for key in layout.order]).clone()

        self.ibar, self.ubar = flat(sd["ibar"]), flat(sd["ubar"])
        self.updates, self.skipped = int(sd["updates"]), int(sd["skipped"])
