"""Where a result came from: the commit and the versions, recorded beside every result."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Dict, Optional

import torch

import adalora


def versions() -> Dict[str, Optional[str]]:
    out = {"adalora": getattr(adalora, "__version__", None), "torch": torch.__version__,
           "python": platform.python_version()}
    for mod in ("transformers", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def git_commit() -> Optional[str]:
    """ADALORA_GIT_COMMIT when set (code sent to another machine runs in a copy whose .git, if
    any, need not match the tree), else HEAD of the checkout."""
    if os.environ.get("ADALORA_GIT_COMMIT"):
        return os.environ["ADALORA_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None
