"""README snippets run as pasted: every ``python`` block (and ``curl`` block, in
``tests/engine/test_serve_inputs.py``) unless the line before it says
``<!-- readme-test: skip (...) -->`` (snippets that need a real 8B model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = "<!-- readme-test: skip"


def snippets(language: str) -> list[tuple[str, bool]]:
    """(code, skipped) of every fenced block of ``language`` in README.md."""
    text = (ROOT / "README.md").read_text()
    found = []
    for m in re.finditer(r"```%s\n(.*?)```" % language, text, re.S):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((m.group(1), before.startswith(SKIP)))
    return found


def test_every_runnable_python_snippet_is_tested():
    runnable = [code for code, skipped in snippets("python") if not skipped]
    assert len(runnable) == 1 and "vllm import LLM" in runnable[0], "a new README python snippet needs a test"


@pytest.mark.slow
def test_offline_llm_snippet_runs_as_pasted(tmp_path):
    code = next(code for code, skipped in snippets("python") if not skipped and "vllm import LLM" in code)
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    prompt = re.search(r'"content": "(sort [0-9 ]+)"', code).group(1)
    expected = sorted(prompt.split()[1:], key=int)
    assert any(line.split() == expected for line in out.stdout.splitlines()), out.stdout[-1500:]
