"""The memory/step-time table of run.sh's ``memory`` stage, from run folders only:

    python analysis/studies/decoder_smollm2/measure.py ROOT/memory     # Markdown on stdout

Per run folder: ``summary.json`` ``memory`` (``weights_bytes``: the model as stored;
``peak_gpu_bytes``: torch.cuda.max_memory_allocated over the run, evaluation included), the
step time (median over consecutive train lines of metrics.jsonl of the seconds per step, the
first line skipped: warm-up and allocation) and the final test scores.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def step_time(metrics_path: Path):
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines()]
    train = [m for m in lines if m["split"] == "train"]
    per = [(b["time_s"] - a["time_s"]) / (b["step"] - a["step"]) for a, b in zip(train[1:], train[2:])]
    return statistics.median(per) if per else None


def table(root: Path) -> str:
    rows = ["| run | status | weights MiB | peak GPU MiB | step ms | test accuracy | test exact match |",
            "|---|---|---|---|---|---|---|"]
    mib = lambda b: "–" if b is None else f"{b / 2 ** 20:.0f}"  # noqa: E731
    num = lambda v, f: "–" if v is None else format(v, f)        # noqa: E731
    for p in sorted(root.glob("*/summary.json")):
        s = json.loads(p.read_text())
        mem, t = s.get("memory") or {}, (s.get("final") or {}).get("test") or {}
        st = step_time(p.parent / "metrics.jsonl") if (p.parent / "metrics.jsonl").is_file() else None
        rows.append(f"| {p.parent.name} | {s['status']} | {mib(mem.get('weights_bytes'))} | "
                    f"{mib(mem.get('peak_gpu_bytes'))} | {num(st and 1000 * st, '.1f')} | "
                    f"{num(t.get('accuracy'), '.4f')} | {num(t.get('exact_match'), '.4f')} |")
    return "\n".join(rows)


def table_from_json(path: Path) -> str:
    """The same table from a committed results file (memory.json), not from run folders."""
    d = json.loads(Path(path).read_text())
    rows = ["| run | status | weights MiB | peak GPU MiB | step ms | test accuracy | test exact match |",
            "|---|---|---|---|---|---|---|"]
    mib = lambda b: "–" if b is None else f"{b / 2 ** 20:.0f}"  # noqa: E731
    num = lambda v, f: "–" if v is None else format(v, f)        # noqa: E731
    for r in d["runs"]:
        t, st = r.get("test") or {}, r.get("median_step_s")
        rows.append(f"| {r['run']} | {r['status']} | {mib(r['weights_bytes'])} | {mib(r['peak_gpu_bytes'])} | "
                    f"{num(st and 1000 * st, '.1f')} | {num(t.get('accuracy'), '.4f')} | "
                    f"{num(t.get('exact_match'), '.4f')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: measure.py ROOT (a folder of run folders) | measure.py memory.json", file=sys.stderr)
        sys.exit(2)
    arg = Path(sys.argv[1])
    print(table_from_json(arg) if arg.suffix == ".json" else table(arg))
