"""Budget schedule preview: see what a schedule does before spending GPU hours on it.

    python -m analysis.schedule --total-steps 1000 --init-warmup 100 --final-warmup 300 \\
        --mask-interval 10 --init-rank 12 --target-rank 8 --n-adapters 12 --out schedule.png

The curve is computed by `adalora.schedule` itself (the function the allocator calls), never
re-implemented here, so the preview cannot drift from what training does.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from analysis.plots.style import METHOD_COLOURS, plt, save

PHASE_COLOURS = {"warmup": "#e8f0fa", "budgeting": "#fdf1e4", "final": "#eaf6ea"}


def scheduled_budget(schedule: dict, steps) -> np.ndarray:
    """b(t) at the given steps for a run's `summary.schedule` dict (keys as in the
    run-folder contract, experiments/README.md)."""
    from adalora.schedule import budget_at  # lazy: adalora imports torch; tables need neither
    cfg = _config(schedule)
    return np.array([budget_at(int(t), cfg, int(schedule["initial_budget"]), int(schedule["target_budget"]))
                     for t in steps])


def phase_spans(schedule: dict) -> list[tuple[str, int, int]]:
    """(phase, first step, last step) for warmup, budgeting and final, via adalora.schedule.phase.
    Steps run 0 .. T-1 (optimizer step indices, as ranks.jsonl records them)."""
    from adalora.schedule import phase
    cfg = _config(schedule)
    spans: list[tuple[str, int, int]] = []
    for t in range(cfg.total_steps):
        p = phase(t, cfg)
        if spans and spans[-1][0] == p:
            spans[-1] = (p, spans[-1][1], t)
        else:
            spans.append((p, t, t))
    return spans


def mask_steps(schedule: dict) -> list[int]:
    from adalora.schedule import is_mask_step
    cfg = _config(schedule)
    return [t for t in range(cfg.total_steps) if is_mask_step(t, cfg)]


def shade_phases(ax, schedule: dict, label: bool = True) -> None:
    """Background bands for the three phases; used by the preview and the run timeline."""
    spans = phase_spans(schedule)
    for k, (name, lo, hi) in enumerate(spans):
        # bands meet (no white gap between phases), and the last runs to T, where step T-1 ends
        hi = spans[k + 1][1] if k + 1 < len(spans) else int(schedule["total_steps"])
        ax.axvspan(lo, hi, color=PHASE_COLOURS[name], zorder=0, lw=0)
        if label:
            ax.text((lo + hi) / 2, 1.0, name, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, color="#555555")


def plot_schedule(schedule: dict, n_adapters: int | None = None):
    """Figure: scheduled budget over steps, phases shaded, mask steps marked, mean rank on the right."""
    total = int(schedule["total_steps"])
    steps = np.arange(total + 1)
    budget = scheduled_budget(schedule, steps)
    masks = mask_steps(schedule)
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    shade_phases(ax, schedule)
    ax.plot(steps, budget, color=METHOD_COLOURS["adalora"], lw=2, label=f"budget b(t) ({schedule.get('shape', 'cubic')})")
    ax.plot(masks, scheduled_budget(schedule, masks), "o", ms=3, color="#333333",
            label=f"mask steps ({len(masks)})")
    ax.axhline(int(schedule["target_budget"]), ls=":", color="#555555",
               label=f"target $b_T$ = {int(schedule['target_budget'])}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("budget (singular values kept, all adapters)")
    ax.set_xlim(0, total)
    ax.set_title(f"AdaLoRA budget schedule: $b_0$ = {int(schedule['initial_budget'])} → "
                 f"$b_T$ = {int(schedule['target_budget'])} over {total} steps", pad=16)
    if n_adapters:  # the same curve read as the average rank per adapted matrix
        right = ax.secondary_yaxis("right", functions=(lambda b: b / n_adapters, lambda r: r * n_adapters))
        right.set_ylabel(f"mean rank per matrix ({n_adapters} matrices)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def describe(schedule: dict) -> str:
    """Phase boundaries and counts as text (what the CLI prints)."""
    masks = mask_steps(schedule)
    lines = [f"initial budget b_0 = {int(schedule['initial_budget'])}, target b_T = {int(schedule['target_budget'])}"]
    for name, lo, hi in phase_spans(schedule):
        lines.append(f"  {name:<9} steps {lo:>6} .. {hi:<6}")
    final = _config(schedule).final_step   # T - t_f, or T-1 when t_f = 0
    lines.append(f"  {len(masks)} mask steps, first {masks[0] if masks else '-'}, "
                 f"final allocation forced at step {final}")
    return "\n".join(lines)


def _config(schedule: dict):
    from adalora.config import ScheduleConfig
    return ScheduleConfig(target_total=int(schedule["target_budget"]), total_steps=int(schedule["total_steps"]),
                          init_warmup=int(schedule["init_warmup"]), final_warmup=int(schedule["final_warmup"]),
                          mask_interval=int(schedule["mask_interval"]), shape=schedule.get("shape") or "cubic")


def main(argv=None) -> int:
    from adalora.config import SCHEDULE_SHAPES, AdapterConfig, ScheduleConfig
    lib, lib_r0 = ScheduleConfig(), AdapterConfig().init_rank      # the library's defaults
    ap = argparse.ArgumentParser(prog="python -m analysis.schedule", description=__doc__.split("\n\n")[0])
    ap.add_argument("--total-steps", type=int, required=True, help="T, optimizer steps")
    ap.add_argument("--init-warmup", type=int, default=lib.init_warmup, help="t_i: steps before any pruning")
    ap.add_argument("--final-warmup", type=int, default=lib.final_warmup, help="t_f: last steps with a frozen mask")
    ap.add_argument("--mask-interval", type=int, default=lib.mask_interval, help="Delta T: steps between allocations")
    ap.add_argument("--init-rank", type=int, default=lib_r0, help="r0 of every adapter")
    ap.add_argument("--target-rank", type=float, default=lib.target_rank, help="average final rank per adapter")
    ap.add_argument("--target-total", type=int, default=None, help="b_T directly (wins over --target-rank)")
    ap.add_argument("--n-adapters", type=int, required=True, help="number of adapted matrices")
    ap.add_argument("--shape", default=lib.shape, choices=SCHEDULE_SHAPES)
    ap.add_argument("--out", default="schedule.png", help="figure path; .png and .pdf are written")
    args = ap.parse_args(argv)
    from adalora.config import ScheduleConfig
    from adalora.schedule import target_budget
    for flag, v in (("--n-adapters", args.n_adapters), ("--init-rank", args.init_rank)):
        if v < 1:   # else the budget check below blames --target-rank
            print(f"invalid schedule: {flag}={v}: give 1 or more", file=sys.stderr)
            return 2
    try:  # ScheduleConfig validates and names the fix; show that, not a traceback
        cfg = ScheduleConfig(target_rank=args.target_rank, target_total=args.target_total,
                             total_steps=args.total_steps, init_warmup=args.init_warmup,
                             final_warmup=args.final_warmup, mask_interval=args.mask_interval, shape=args.shape)
    except ValueError as e:
        print(f"invalid schedule: {e}", file=sys.stderr)
        return 2
    schedule = {"total_steps": cfg.total_steps, "init_warmup": cfg.init_warmup, "final_warmup": cfg.final_warmup,
                "mask_interval": cfg.mask_interval, "shape": cfg.shape,
                "initial_budget": args.init_rank * args.n_adapters,
                "target_budget": target_budget(cfg, args.n_adapters)}
    if schedule["target_budget"] >= schedule["initial_budget"]:
        print(f"invalid schedule: target budget {schedule['target_budget']} >= initial budget "
              f"{schedule['initial_budget']}: lower --target-rank below --init-rank", file=sys.stderr)
        return 2
    print(describe(schedule))
    stem = args.out[: -len(".png")] if args.out.endswith(".png") else args.out
    for path in save(plot_schedule(schedule, args.n_adapters), stem):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
