"""The README's Python snippet runs verbatim (from the repository root, with the real SmolLM2)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python block"
    return blocks[0]


@pytest.mark.slow
def test_readme_snippet_runs_verbatim(tmp_path: Path) -> None:
    snippet = readme_snippet()
    assert 'MultimodalLM.from_config("training/configs/quickstart.yaml")' in snippet
    # Run from a copy of the paths the snippet names so that "out/" lands in tmp_path.
    (tmp_path / "training").symlink_to(ROOT / "training")
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "generate printed nothing"
    assert (tmp_path / "out" / "mm_llama.yaml").is_file()
    assert (tmp_path / "out" / "projectors.safetensors").is_file()
    processor_snippet = next(
        b
        for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
        if "MultimodalProcessor.from_pretrained" in b
    )
    script = (
        processor_snippet
        + "\nimport mm_llama.llm, sys\nassert 'transformers.models.llama.modeling_llama' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "proc" / "processor.yaml").is_file()
