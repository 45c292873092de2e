"""The memory/step-time table of run.sh's ``memory`` stage, from run folders only:

    python analysis/studies/decoder_smollm2/measure.py ROOT/memory               # Markdown on stdout
    python analysis/studies/decoder_smollm2/measure.py ROOT/memory --write F.json  # + the results file
    python analysis/studies/decoder_smollm2/measure.py F.json                      # the table from it

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


def records(root: Path) -> list[dict]:
    """One row per run folder, as a committed results file holds them."""
    runs = []
    for p in sorted(root.glob("*/summary.json")):
        s = json.loads(p.read_text())
        mem = s.get("memory") or {}
        metrics = p.parent / "metrics.jsonl"
        runs.append({"run": p.parent.name, "status": s["status"], "method": s.get("method"),
                     "weights_bytes": mem.get("weights_bytes"), "peak_gpu_bytes": mem.get("peak_gpu_bytes"),
                     "median_step_s": step_time(metrics) if metrics.is_file() else None,
                     "test": (s.get("final") or {}).get("test"), "git_commit": s.get("git_commit")})
    return runs


def render(runs: list[dict]) -> str:
    rows = ["| run | status | weights MiB | peak GPU MiB | step ms | test accuracy | test exact match |",
            "|---|---|---|---|---|---|---|"]
    mib = lambda b: "–" if b is None else f"{b / 2 ** 20:.0f}"  # noqa: E731
    num = lambda v, f: "–" if v is None else format(v, f)        # noqa: E731
    for r in runs:
        t, st = r.get("test") or {}, r.get("median_step_s")
        rows.append(f"| {r['run']} | {r['status']} | {mib(r.get('weights_bytes'))} | {mib(r.get('peak_gpu_bytes'))} | "
                    f"{num(st and 1000 * st, '.1f')} | {num(t.get('accuracy'), '.4f')} | "
                    f"{num(t.get('exact_match'), '.4f')} |")
    return "\n".join(rows)


def table(root: Path) -> str:
    """The table from run folders."""
    return render(records(root))


def table_from_json(path: Path) -> str:
    """The same table from a committed results file (memory.json, nf4_real.json)."""
    return render(json.loads(Path(path).read_text())["runs"])


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--write"):
        print("usage: measure.py ROOT [--write FILE.json] | measure.py FILE.json", file=sys.stderr)
        sys.exit(2)
    arg = Path(args[0])
    if len(args) == 3:
        # the provenance fields (machine, versions, command, note) are added by hand: run folders
        # do not record the machine
        out = Path(args[2])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"kind": "decoder_memory", "runs": records(arg)}, indent=1) + "\n")
        tmp.replace(out)
    print(table_from_json(arg) if arg.suffix == ".json" else table(arg))
