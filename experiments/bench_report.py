"""The benchmark's results.json as Markdown tables (results.md beside it)."""
from __future__ import annotations

import math


def _mode(c: dict) -> str:
    step = (", whole step as one CUDA graph" if c.get("step_graph") else
            ", the step after backward as CUDA graphs" if c.get("tail_graph") else "")
    if not c["compile"]:
        return (", eager kernels" + step) if step else ", eager"
    backend = c.get("compile_backend", "inductor")
    return f", torch.compile {c.get('compile_mode', 'default') if backend == 'inductor' else 'backend ' + backend}{step}"


def markdown(result: dict) -> str:
    c, env = result["config"], result["env"]
    lines = [f"## {c['layers']} x {c['hidden']}, seq {c['seq']}, batch {c['batch']}, {c['dtype']}"
             f"{' (' + c['bf16_mode'] + ')' if c['dtype'] == 'bf16' else ''}"
             f"{_mode(c)} on {env.get('gpu') or 'CPU'} "
             f"({env['threads']} threads; torch {env['torch']}, peft {env['peft']})", "",
             f"{c['rounds']} interleaved rounds x {c['steps']} steps after {c['warmup']} warm-up steps. "
             f"Peak memory: {'CUDA max allocated' if 'gpu' in env else 'RSS growth (coarse)'} per variant.", "",
             "Kernel ms: the GPU's kernels per step, their durations summed (profiled after the timed rounds); "
             "idle ms: the median minus it, the GPU waiting for the host (negative where kernels ran at once "
             "on two streams).", "",
             "| variant | median ms/step | IQR ms | min ms | vs floor | kernel ms | kernels | idle ms | peak MiB "
             "| trainable params | allocator state MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    res = result["variants"]
    floor = res.get("floor", {}).get("median_ms")
    for n, r in res.items():
        rel = f"{r['median_ms'] / floor:.2f}x" if floor else "-"
        k = r.get("kernel_ms")
        dev = (f"{k:.1f} | {r['kernels']:.0f} | {r['median_ms'] - k:.1f}" if k is not None else "- | - | -")
        lines.append(f"| {n} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['min_ms']:.1f} | {rel} | {dev} | "
                     f"{r['peak_mem_mb']:.0f} | {r['trainable_params']:,} | {r['alloc_state_bytes'] / 2**20:.2f} |")
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    phased = {n: r["host_phases_ms"] for n, r in res.items() if r.get("host_phases_ms")}
    if phased:
        names = list(next(iter(phased.values())))
        lines += ["", "Host ms per phase of an eager step (medians; each step starts on an idle device; update: "
                  "AdamW, then the allocator's importance update and mask step):", "",
                  "| variant | " + " | ".join(names) + " | sum |", "|---|" + "---:|" * (len(names) + 1)]
        lines += [f"| {n} | " + " | ".join(f"{p[k]:.2f}" for k in names) + f" | {sum(p.values()):.2f} |"
                  for n, p in phased.items()]
    for key, what in (("graph_check", "The captured step against the eager one"),
                      ("fused_check", "Each fused path against the unfused one")):
        check = result.get(key)
        if not check:
            continue
        lines += ["", f"{what}, same weights and batch:", "",
                  "| variant | steps | max abs loss diff | max rel loss diff | steps with equal masks | "
                  "most mask values apart |", "|---|---:|---:|---:|---:|---:|"]
        for n, r in check.items():
            lines.append(f"| {n} | {r['steps']} | {r['max_abs_loss_diff']:.3g} | {r['max_rel_loss_diff']:.3g} | "
                         f"{r.get('mask_equal_steps', '-')} | {r.get('mask_disagreeing_values', '-')} |")
    rows = result.get("allocator", [])
    if rows:
        lines += ["", f"Allocator only (update_importance + mask_to_budget, synthetic grads, hidden {rows[0]['hidden']}):",
                  "", "| layers | adapters | ours ms (mask every step) | ours ms (every 10) | peft ms (every step) | "
                  "ours ops mask/non-mask step | peft ops | ours syncs mask/non-mask | ours state MiB | peft state MiB |",
                  "|---:|---:|---:|---:|---:|---|---:|---|---:|---:|"]
        for r in rows:
            p = r.get("peft_mask_every_step_ops", {})
            lines.append(
                f"| {r['layers']} | {r['adapters']} | {r['ours_mask_every_step_ms']:.2f} | {r['ours_mask_every_10_ms']:.2f} | "
                f"{r.get('peft_mask_every_step_ms', float('nan')):.2f} | {r['ours_mask_every_step_ops']['ops']}/"
                f"{r['ours_nonmask_step_ops']['ops']} | {p.get('ops', '-')} | {r['ours_mask_every_step_ops']['host_syncs']}/"
                f"{r['ours_nonmask_step_ops']['host_syncs']} | {r['ours_state_bytes'] / 2**20:.2f} | "
                f"{r.get('peft_state_bytes', math.nan) / 2**20:.2f} |")
    return "\n".join(lines) + "\n"
