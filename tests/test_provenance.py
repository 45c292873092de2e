"""Where a result came from: the commit recorded with every run and benchmark."""
import subprocess
from pathlib import Path

from experiments.provenance import git_commit, versions


def test_an_explicit_commit_wins_over_the_checkout(monkeypatch):
    """Code sent to another machine runs in a copy whose .git need not match its tree."""
    monkeypatch.setenv("ADALORA_GIT_COMMIT", "0123abc")
    assert git_commit() == "0123abc"


def test_without_one_the_checkout_head_is_recorded(monkeypatch):
    monkeypatch.delenv("ADALORA_GIT_COMMIT", raising=False)
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    assert git_commit() == (head.stdout.strip() or None if head.returncode == 0 else None)


def test_versions_name_the_stack():
    v = versions()
    assert {"adalora", "torch", "python", "transformers", "peft"} <= set(v) and v["torch"]
