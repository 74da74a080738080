"""The README's Python snippet runs as written (from the repository root: it reads the shipped
generalist and writes under runs/)."""

import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert blocks, "the README has a Python snippet"
    os.symlink(ROOT / "assets", tmp_path / "assets")  # a repository root whose runs/ is a scratch folder
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    chunk = namespace["chunk"]
    assert chunk.shape == (8, 4) and chunk.dtype == np.float32 and np.isfinite(chunk).all()
    assert (tmp_path / "runs" / "ckpt" / "model.safetensors").is_file()
