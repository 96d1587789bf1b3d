"""The `llama-jax` command, run as a user runs it (a subprocess of the installed script)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = shutil.which("llama-jax", path=str(Path(sys.executable).parent)) or "llama-jax"


def test_chat_answers_the_readme_question():
    out = subprocess.run(
        [SCRIPT, "chat", "What is the capital of France?", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of France is Paris."


def test_missing_model_file_is_a_clear_error(tmp_path, capsys):
    from llama_jax.cli import main

    missing = tmp_path / "nope.gguf"
    assert main(["chat", "hi", "--model", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err


def test_interactive_chat_answers_and_exits():
    out = subprocess.run(
        [SCRIPT, "chat", "--temperature", "0", "--max-tokens", "16"],
        input="What is the capital of France?\n/reset\n/exit\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
