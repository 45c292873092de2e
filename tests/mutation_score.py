"""Mutation score of the core library, from ``mutmut results`` and the equivalent-mutant list.

Run by ``make mutation`` after ``mutmut run``. A surviving mutant counts as killed only when
``tests/mutation_equivalents.md`` lists it (its name in backticks, then a reason). Exits non-zero
when a listed mutant no longer exists or no longer survives (the list must stay true), when any
mutant has no tests or was not checked, or when the score is below ``--min``.

    python tests/mutation_score.py [--min 95] [--results FILE] [--equivalents FILE]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.md"
# mutmut 3.8.1 statuses (mutmut/stats.py) -> our categories; a timeout or a crash is a detection.
CATEGORY = {"killed": "killed", "timeout": "killed", "segfault": "killed", "caught by type check": "killed",
            "survived": "survived", "no tests": "no tests"}
LINE = re.compile(r"^\s*(\S+): (.+?)\s*$")
LISTED = re.compile(r"`(adalora\.[^`\s]+__mutmut_\d+)`\s*[:\-–—|]?\s*(.*)$")


def mutmut_results() -> str:
    cmd = [sys.executable, str(ROOT / "tests" / "mutmut_run.py"),
           "results", "--all", "true"]
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def parse_results(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m and "__mutmut_" in m.group(1):
            out[m.group(1)] = m.group(2)
    return out


def parse_equivalents(text: str) -> tuple[dict[str, str], list[str]]:
    listed, problems = {}, []
    for n, line in enumerate(text.splitlines(), 1):
        m = LISTED.search(line)
        if not m:
            continue
        name, reason = m.group(1), m.group(2).strip()
        if not reason:
            problems.append(f"line {n}: {name} has no reason")
        if name in listed:
            problems.append(f"line {n}: {name} listed twice")
        listed[name] = reason
    return listed, problems


def module_of(name: str) -> str:
    return name.split(".")[1]          # adalora.<module>.x_...


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min", type=float, default=None, help="fail below this score (percent)")
    ap.add_argument("--results", type=Path, help="saved `mutmut results --all true` output")
    ap.add_argument("--equivalents", type=Path, default=EQUIVALENTS)
    args = ap.parse_args(argv)

    results = parse_results(args.results.read_text() if args.results else mutmut_results())
    if not results:
        print("no mutants in `mutmut results`: run `mutmut run` (make mutation) first")
        return 1
    listed, problems = parse_equivalents(args.equivalents.read_text(encoding="utf-8"))

    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, status in sorted(results.items()):
        cat = CATEGORY.get(status, "other")
        if name in listed:
            if status != "survived":
                problems.append(f"{name} is listed as equivalent but is '{status}' now: remove it from the list")
            else:
                cat = "equivalent"
        if cat == "no tests":
            problems.append(f"{name}: no test reaches it")
        elif cat == "other":
            problems.append(f"{name}: status '{status}' (rerun mutmut)")
        per_module[module_of(name)][cat] += 1
    for name in listed:
        if name not in results:
            problems.append(f"{name} is listed as equivalent but mutmut no longer generates it: update the list")

    cols = ("killed", "survived", "equivalent", "no tests", "other")
    print(f"{'module':<12}" + "".join(f"{c:>11}" for c in cols) + f"{'total':>8}{'score':>9}")
    total = Counter()
    for mod in sorted(per_module):
        c = per_module[mod]
        total.update(c)
        n = sum(c.values())
        print(f"{mod:<12}" + "".join(f"{c[k]:>11}" for k in cols)
              + f"{n:>8}{100 * (c['killed'] + c['equivalent']) / n:>8.1f}%")
    n = sum(total.values())
    score = 100 * (total["killed"] + total["equivalent"]) / n
    print(f"{'all':<12}" + "".join(f"{total[k]:>11}" for k in cols) + f"{n:>8}{score:>8.1f}%")
    print(f"mutation score: {score:.1f}% ((killed + listed equivalent) / all mutants)")
    survivors = [k for k, v in results.items() if v == "survived" and k not in listed]
    if survivors:
        print(f"{len(survivors)} unlisted survivors (mutmut show <name>):")
        for k in survivors:
            print("   ", k)
    for p in problems:
        print("ERROR:", p)
    if args.min is not None and score < args.min:
        print(f"ERROR: score {score:.1f}% is below the required {args.min:g}%")
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
