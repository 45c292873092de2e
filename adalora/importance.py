"""Importance of singular values (paper Eqs. 9-13), smoothed over steps.

For every element ``w`` of ``P``, ``lam``, ``Q``:
``I = |w · ∂L/∂w|``; ``Ī ← β1 Ī + (1−β1) I``; ``Ū ← β2 Ū + (1−β2) |I − Ī|``; ``s = Ī · Ū``.
Triplet score of singular value ``i``: ``S_i = s(lam_i) + mean_j s(P_ji) + mean_j s(Q_ij)``.

The update runs as a handful of fused multi-tensor kernels (``torch._foreach_*``) over all
adapters at once; the only state is ``Ī`` and ``Ū`` (``I`` is transient).
"""
from __future__ import annotations

import torch

from .config import ScoreConfig
from .layers import SVDLinear


def triplet_scores(s_P: torch.Tensor, s_lam: torch.Tensor, s_Q: torch.Tensor) -> torch.Tensor:
    """Eq. 9: ``(d_out, r), (r,), (r, d_in) -> (r,)``."""
    return s_lam + s_P.mean(dim=0) + s_Q.mean(dim=1)


class ImportanceScorer:
    """Holds the EMAs ``Ī``, ``Ū`` for the SVD adapters given, in their order.

    ``kind``: ``sensitivity_uncertainty`` (``s = Ī·Ū``, default), ``sensitivity`` (``s = Ī``),
    ``magnitude`` (``S = |lam_i|``, no state) or ``random`` (fresh uniform scores per call,
    seeded by ``(seed, step)`` so that a resumed run draws the same numbers).
    """

    def __init__(self, layers: list[SVDLinear], cfg: ScoreConfig):
        self.layers = layers
        self.cfg = cfg
        self.uses_grad = cfg.kind in ("sensitivity_uncertainty", "sensitivity")
        self.ibar: list[torch.Tensor] | None = None
        self.ubar: list[torch.Tensor] | None = None
        self.updates = 0
        self.skipped = 0

    def params(self) -> list[torch.Tensor]:
        # Read from the layers each time: resize() replaces the Parameter objects.
        return [t for layer in self.layers for t in (layer.P, layer.lam, layer.Q)]

    def _grads(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        grads = []
        for i, p in enumerate(params):
            if p.grad is None and p.numel() == 0:
                grads.append(torch.zeros_like(p))   # a rank-0 adapter: forward skips it, nothing to score
                continue
            if p.grad is None:
                layer = self.layers[i // 3]
                raise RuntimeError(
                    f"no gradient for {('P', 'lam', 'Q')[i % 3]} of an SVD adapter {layer.extra_repr()}: "
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
        params = self.params()
        grads = self._grads(params)
        if params[0].dtype in (torch.float16, torch.bfloat16):
            # Form |w · g| in fp32: the product rounded to bf16 would lose 2^-9 before the fp32 EMAs.
            params, grads = [p.float() for p in params], [g.float() for g in grads]
        ipt = torch._foreach_mul(params, grads)                     # I = |w · g|, transient
        torch._foreach_abs_(ipt)
        if grads_finite is None:
            # One fused reduction and a single host sync for the finiteness check.
            grads_finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(ipt)).sum()))
        if not grads_finite:
            self.skipped += 1
            return False
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        if self.ibar is None:
            self.ibar = [torch.zeros_like(p, dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16)
                                          else p.dtype) for p in params]
            if self.cfg.kind == "sensitivity_uncertainty":
                self.ubar = [torch.zeros_like(t) for t in self.ibar]
        torch._foreach_mul_(self.ibar, b1)                          # Ī ← β1 Ī + (1−β1) I
        torch._foreach_add_(self.ibar, ipt, alpha=1 - b1)
        if self.ubar is not None:
            torch._foreach_sub_(ipt, self.ibar)                     # |I − Ī| with the updated Ī
            torch._foreach_abs_(ipt)
            torch._foreach_mul_(self.ubar, b2)                      # Ū ← β2 Ū + (1−β2) |I − Ī|
            torch._foreach_add_(self.ubar, ipt, alpha=1 - b2)
        self.updates += 1
        return True

    @torch.no_grad()
    def scores(self, step: int = 0) -> list[torch.Tensor]:
        """Triplet scores ``S_k (r_k,)`` per layer, in layer order."""
        if self.cfg.kind == "magnitude":
            return [layer.lam.detach().abs().float() for layer in self.layers]
        if self.cfg.kind == "random":
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
            return [torch.rand(layer.rank, generator=g).to(layer.lam.device) for layer in self.layers]
        if self.ibar is None:
            # Never updated (e.g. masking before any backward): every triplet scores zero.
            return [torch.zeros(layer.rank, device=layer.lam.device) for layer in self.layers]
        s = self.ibar if self.ubar is None else torch._foreach_mul(self.ibar, self.ubar)
        return [triplet_scores(s[3 * k], s[3 * k + 1], s[3 * k + 2]) for k in range(len(self.layers))]

    def free(self) -> None:
        """Drop the EMAs (after the final allocation nothing is scored any more)."""
        self.ibar = self.ubar = None

    @torch.no_grad()
    def slice_(self, k: int, keep: torch.Tensor) -> None:
        """Keep EMA entries of layer ``k`` for singular values ``keep`` (after a resize)."""
        for buf in (self.ibar, self.ubar):
            if buf is not None:
                buf[3 * k] = buf[3 * k][:, keep].clone()
                buf[3 * k + 1] = buf[3 * k + 1][keep].clone()
                buf[3 * k + 2] = buf[3 * k + 2][keep].clone()

    def state_dict(self) -> dict:
        return {"ibar": self.ibar, "ubar": self.ubar, "updates": self.updates, "skipped": self.skipped}

    def load_state_dict(self, sd: dict) -> None:
        self.ibar = None if sd["ibar"] is None else [t.clone() for t in sd["ibar"]]
        self.ubar = None if sd["ubar"] is None else [t.clone() for t in sd["ubar"]]
        self.updates, self.skipped = int(sd["updates"]), int(sd["skipped"])
