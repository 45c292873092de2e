"""The README's quickstart runs as written."""
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_and_prunes_to_budget(tmp_path):
    code = _python_blocks()[0]
    out = subprocess.run([sys.executable, "-c", code + "\nassert sum(alloc.ranks().values()) == 6\n"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "adapters.safetensors").exists() and (tmp_path / "adapters.json").exists()


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_import_adalora_pulls_no_optional_stack():
    code = "import sys, adalora; bad = {'hydra', 'matplotlib', 'transformers', 'pandas'} & set(sys.modules); print(bad); assert not bad"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
