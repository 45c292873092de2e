"""Adapters called on the same input tensor share one down-projection (horizontal fusion).

The q, k and v projections of an attention block, and a gated MLP's gate and up projections,
are called on the same tensor ``x (N, d_in)``. On the epilogue path (adalora/fused.py) each
adapter on them reads x for its own ``hᵀ_k = D_k xᵀ``, reads it again backward for
``dD_k = s_k (G_k U_k)ᵀ x``, and adds ``s_k (G_k U_k) D_k`` into its own input gradient: per
adapter one more read of x each way and one more pass over ``dx``. For a group of adapters
``1..L`` called one after another on the same x, with ``D = [D_1; ...; D_L] (Σr, d_in)``:

    Hᵀ  = D xᵀ                           (Σr, N)   one GEMM, x read once
    y_1 = x W_1ᵀ + b_1 + s_1 h_1 U_1ᵀ     the leader (the group's first call) computes Hᵀ
    y_k = x W_kᵀ + b_k + s_k h_k U_kᵀ     each follower is handed its rows hᵀ_k of Hᵀ

and backward, with ``T = [s_1 (G_1 U_1)ᵀ; ...; s_L (G_L U_L)ᵀ] (Σr, N)`` (each follower returns
its rows as the gradient of its ``hᵀ_k``, and the leader joins them):

    dx_1 = G_1 W_1 + Tᵀ D                one in-place GEMM pass: the whole group's share
    dx_k = G_k W_k                       followers: the frozen share only
    dD   = T x                           one GEMM, x read once

On the merge path each member multiplies by its own ``W'_k = W_k + s_k U_k D_k`` instead
(adalora/fused.py): ``y_k = x W'_kᵀ + b_k`` and ``dx_k = G_k W'_k``, so no member passes over its
output or ``dx``; the group still shares ``Hᵀ`` (for the ``dU_k``) and ``dD = T x``.

The sum of the ``dx_k`` (autograd adds them, as without the group) and every other gradient are
those of the adapters alone; ``D`` is the group's rows of the down factors that
adalora/factor_batch.py prepares per width (``lam ⊙ Q``, cast under autocast), so the group's
members are adjacent there and ``D`` is a view.

Which adapters share an input is seen, not declared: while the model's forward runs, each
adapter on the epilogue path records the tensor it was called on, and adapters called in a row on
the same tensor object form a group for the next forward (``plan``). A plan can be wrong by the
time it is used (another path through the model, an in-place write to x between the calls): a
follower takes its rows only when it is called on the very tensor they were computed from,
unmodified, and otherwise computes its own, the leader's rows for it then getting a zero
gradient. A stale plan costs time, never a wrong result. The first forward has no plan, nor
does a model that calls one adapter twice in a forward; under ``torch.inference_mode`` (whose
tensors keep no version counter) no rows are handed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import rank_update, side_stream
from .lowrank_gemm import scaled_mm
from .rank_update import merged_weight

CALLS = "_shared_input_calls"   # the forward's Calls, in an adapter's __dict__ while the forward runs
HANDED = "_shared_input_rows"   # a follower's (x, x._version, hᵀ_k), set by its leader
PLAN = "_shared_input_plan"     # the model's groups, tuples of adapters in call order


class Calls:
    """One forward's adapter calls as runs on the same tensor. Only the last tensor is held, so
    recording keeps no activation alive (under no_grad nothing else would)."""
    __slots__ = ("last", "runs")

    def __init__(self):
        self.last, self.runs = None, []

    def add(self, layer, x: torch.Tensor) -> None:
        if self.runs and x is self.last:
            self.runs[-1].append(layer)
        else:
            self.runs.append([layer])
            self.last = x


def plan(model) -> tuple:
    """The groups the next forward of ``model`` shares inputs in (``()`` before any forward)."""
    return model.__dict__.get(PLAN, ())


def record(layer, x: torch.Tensor) -> None:
    calls = layer.__dict__.get(CALLS)
    if calls is not None:
        calls.add(layer, x)


def replan(model, calls: Calls) -> None:
    """The groups of one forward: its runs of two or more, none if an adapter ran twice."""
    layers = [layer for run in calls.runs for layer in run]
    once = len({id(layer) for layer in layers}) == len(layers)
    model.__dict__[PLAN] = tuple(tuple(run) for run in calls.runs if len(run) > 1) if once else ()


class Lead:
    """What factor_batch.py hands a group's leader: the group's prepared down factors as one
    ``(Σr, d_in)`` view, its followers in call order, and every member's rank."""
    __slots__ = ("down", "followers", "ranks")

    def __init__(self, down, followers, ranks):
        self.down, self.followers, self.ranks = down, followers, ranks


def forward(layer, x, x2, w, b, down, up, lead, merge, merged):
    """``layer``'s output through its group (``x`` the tensor it was called on, ``x2`` its
    ``(N, d_in)`` rows in the product's dtype, ``down`` its factor as the fused forward holds it;
    ``merge``: the merge path, ``merged`` its ``W'`` where adalora/merge_batch.py formed it), or
    None where it computes its own ``hᵀ``."""
    handed = layer.__dict__.pop(HANDED, None)
    if handed is not None and handed[0] is x and handed[1] == x._version and handed[2].dtype == x2.dtype:
        # merge: W'_k from the follower's own rows. A follower's down factor is always prepared,
        # g ⊙ D in its group's dtype, which is the handed rows' (factor_batch.py), so no gate here.
        if merged is not None:
            w, down = merged, None    # W'_k formed already (merge_batch.py): nothing left to merge
        return FollowLinear.apply(x2, w, b, handed[2], up, layer.scaling, down if merge else None, merge)
    if lead is None or lead.down.dtype != x2.dtype or x.is_inference():
        return None                   # an inference tensor keeps no version: a write could not be seen
    y, *hts = LeadLinear.apply(x2, w if merged is None else merged, b, lead.down, up, layer.scaling, lead.ranks,
                               merge, merged is not None)
    for follower, ht in zip(lead.followers, hts):
        follower.__dict__[HANDED] = (x, x._version, ht)
    return y


class LeadLinear(torch.autograd.Function):
    """The leader's ``y_1`` and every follower's ``hᵀ_k``; backward the group's adapter share of
    ``dx`` and ``dD`` (module docstring). Returns ``(y_1, hᵀ_2, ..., hᵀ_L)``."""

    @staticmethod
    def forward(ctx, x, w, b, down, up, scaling, ranks, merge, merged):
        r = ranks[0]
        if merge and not merged:                             # merged: w is W'_1 already
            w = merged_weight(w, up, down[:r], scaling, x.dtype)   # W'_1 (d_out, d_in), saved for dx_1
        side = side_stream.fork(x)                           # captured: Hᵀ beside the frozen GEMM
        with side_stream.on(side):
            ht = torch.mm(down, x.t())                       # Hᵀ (Σr, N), x read once
        y = F.linear(x, w, b)                                # (N, d_out)
        side_stream.join(side, ht)
        if not merge:
            rank_update.add_(y, ht[:r].t(), up.t(), scaling)   # y += s · h_1 U_1ᵀ, in place
        ctx.save_for_backward(x, w, down, up, ht)
        ctx.scaling, ctx.r, ctx.merge = scaling, r, merge
        hts = ht[r:].split(ranks[1:])
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
            ctx.mark_non_differentiable(*hts)   # nothing to send their gradient to: followers skip it
        return (y, *hts)

    @staticmethod
    def backward(ctx, grad, *grad_hts):
        x, w, down, up, ht = ctx.saved_tensors             # w: W'_1 on the merge path
        s, r = ctx.scaling, ctx.r
        need_x, _, _, need_d, need_u, *_ = ctx.needs_input_grad
        dx = dd = du = None
        # Captured: T, then dD from it, on one side stream and dU_1 on another, beside the frozen
        # G_1 W_1; the pass over dx waits for T alone (adalora/side_stream.py).
        side, other = side_stream.forks(grad)
        with side_stream.on(side):
            # T (Σr, N): the leader's rows s · (G_1 U_1)ᵀ, then each follower's d hᵀ_k
            t = None
            if need_d or need_x and not ctx.merge:
                t = torch.cat([scaled_mm(up.t(), grad.t(), s), *grad_hts])
        with side_stream.on(other):
            du = scaled_mm(ht[:r], grad, s).t() if need_u else None   # s · G_1ᵀ h_1, column-major as U
        if need_x:
            dx = torch.mm(grad, w)                           # G_1 W_1, or G_1 W'_1 merged (N, d_in)
            if not ctx.merge:
                side_stream.join(side, t)
                rank_update.add_(dx, t.t(), down, 1.0)       # + Tᵀ D: the group's share, in place
        with side_stream.on(side):
            dd = torch.mm(t, x) if need_d else None          # T x (Σr, d_in)
        side_stream.join(side, dd)
        side_stream.join(other, du)
        return dx, None, None, dd, du, None, None, None, None


class FollowLinear(torch.autograd.Function):
    """A follower's ``y_k = x W_kᵀ + b_k + s_k h_k U_kᵀ`` from its handed ``hᵀ_k``; backward
    ``G_k W_k`` into x and ``d hᵀ_k = s_k (G_k U_k)ᵀ`` to the leader. x is not saved. On the
    merge path (``merge``) ``dg`` is its ``g_k ⊙ D_k``, for ``W'_k`` only (no gradient: that comes
    via hᵀ_k), or None where ``w`` is ``W'_k`` already."""

    @staticmethod
    def forward(ctx, x, w, b, ht, up, scaling, dg, merge):
        if dg is not None:
            w = merged_weight(w, up, dg, scaling, x.dtype)   # W'_k (d_out, d_in), saved for dx_k
        y = F.linear(x, w, b)                                # (N, d_out)
        if not merge:
            rank_update.add_(y, ht.t(), up.t(), scaling)    # y += s · h Uᵀ, in place
        ctx.save_for_backward(w, up, ht)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, grad):
        w, up, ht = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, _, need_h, need_u, *_ = ctx.needs_input_grad
        # captured: the two thin products on two side streams, beside the frozen G W
        side, other = side_stream.forks(grad)
        with side_stream.on(side):
            dht = scaled_mm(up.t(), grad.t(), s) if need_h else None   # s · (G U)ᵀ (r, N)
        with side_stream.on(other):
            du = scaled_mm(ht, grad, s).t() if need_u else None      # s · Gᵀ h, column-major as U
        dx = torch.mm(grad, w) if need_x else None                   # G W, or G W' merged (N, d_in)
        side_stream.join(side, dht)
        side_stream.join(other, du)
        return dx, None, None, dht, du, None, None, None
