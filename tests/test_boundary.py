"""`serve/` uses the library through its public door only (issue 21): it imports names that
`llama_jax.__all__` lists (or `llama_jax.cli.__all__`, what the `llama-jax` command shares with
`llama-jax serve`), and never reaches under a `Generator` into its scheduler, scheduler thread or
runner. Read from the source, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import llama_jax
import llama_jax.cli

SERVE = Path(__file__).resolve().parent.parent / "serve"
PUBLIC = {
    "llama_jax": set(llama_jax.__all__) | {"__version__"},
    "llama_jax.cli": set(llama_jax.cli.__all__),
}
UNDER_THE_DOOR = {"engine", "scheduler", "loop", "runner"}  # Generator's internals


def violations(source: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("llama_jax")
        ):
            public = PUBLIC.get(node.module)
            if public is None:
                out.append(f"line {node.lineno}: imports from {node.module}, not a public module")
                continue
            out += [
                f"line {node.lineno}: {node.module}.{a.name} is not public"
                for a in node.names
                if a.name not in public
            ]
        elif isinstance(node, ast.Import):
            out += [
                f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("llama_jax")
            ]
        elif isinstance(node, ast.Attribute) and node.attr in UNDER_THE_DOOR:
            out.append(f"line {node.lineno}: .{node.attr} ({ast.unparse(node)})")
    return out


def test_the_checker_finds_imports_of_internals_and_reaches_under_the_generator():
    source = (
        "from llama_jax.scheduler import Delta\n"
        "from llama_jax import Generator, Request\n"
        "import llama_jax.weights\n"
        "def f(gen):\n"
        "    from llama_jax.weights import estimate_memory\n"
        "    return gen.scheduler.eos_ids, gen.loop.backlog, gen.runner.max_slots\n"
    )
    found = violations(source)
    assert len(found) == 7, found
    assert violations("from llama_jax import Generator, __version__\ngen.eos_ids\n") == []


def test_serve_imports_only_public_names_and_never_reaches_under_the_generator():
    found = {
        str(p.relative_to(SERVE.parent)): v
        for p in sorted(SERVE.rglob("*.py"))
        if (v := violations(p.read_text()))
    }
    assert found == {}
