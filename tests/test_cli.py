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


def test_version_and_grouped_help_with_llama_cpp_and_vllm_spellings():
    import llama_jax

    for argv in (["--version"], ["serve", "--version"]):
        out = subprocess.run([SCRIPT, *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == f"llama-jax {llama_jax.__version__}"
    assert llama_jax.__version__ == "0.1.0"  # pyproject.toml's, read from the installed metadata
    help_text = subprocess.run([SCRIPT, "serve", "--help"], capture_output=True, text=True).stdout
    groups = [g for g in ("model:", "engine:", "server:", "security and limits:", "several hosts:")]
    assert [help_text.index(g) for g in groups] == sorted(help_text.index(g) for g in groups)
    for flag in ("-m", "-c N", "--max-model-len", "-np N", "--max-num-seqs", "-a", "--served-model-name"):
        assert flag in help_text
    for flag in ("-t N", "--ssl-certfile", "--ssl-keyfile", "--strict-model-names", "--revision"):
        assert flag in help_text


def test_llama_cpp_and_vllm_spellings_reach_the_same_settings():
    import argparse

    from serve.cli import add_arguments, serve_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    llama_cpp = serve_settings(parser.parse_args(["-hf", "m.gguf", "-c", "4096", "-np", "4", "-a", "mock"]))
    vllm = serve_settings(
        parser.parse_args(
            ["m.gguf", "--max-model-len", "4096", "--max-num-seqs", "4", "--served-model-name", "mock"]
        )
    )
    ours = serve_settings(
        parser.parse_args(
            ["--model", "m.gguf", "--max-seq-len", "4096", "--max-slots", "4", "--alias", "mock"]
        )
    )
    assert llama_cpp == vllm == ours
    assert (ours.model, ours.max_seq_len, ours.max_slots, ours.aliases) == ("m.gguf", 4096, 4, ("mock",))


def test_load_flags_are_made_from_the_load_options_fields():
    import argparse

    from llama_jax.cli import load_flags, load_options

    every = argparse.ArgumentParser()
    load_flags(every, ("dtype", "max_seq_len"))
    assert load_options(every.parse_args(["-c", "64"])) == {"dtype": "auto", "max_seq_len": 64}
    given = argparse.ArgumentParser()
    load_flags(given, ("dtype", "max_seq_len"), given_only=True)  # the server's: only what is given
    assert load_options(given.parse_args(["--max-model-len", "64"])) == {"max_seq_len": 64}
    assert "(default: 2048)" in given.format_help()
