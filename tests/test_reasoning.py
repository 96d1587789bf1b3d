"""Reasoning blocks split off the answer: whole outputs, streams cut at every character
(markers split across tokens), templates that open the block in the prompt, other markers,
and the server setting's precedence (defaults < file < LLAMA_JAX_* < flags)."""

from __future__ import annotations

import argparse

import pytest

from llama_jax.reasoning import (
    MARKERS,
    ReasoningStream,
    opens_in_prompt,
    split_reasoning,
    template_markers,
)

THINK = MARKERS[0]


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("<think>\nLet me see.\n</think>\n\nParis.", "Let me see.\n", "Paris."),
        ("  <think>a</think>b", "a", "b"),
        ("Paris.", None, "Paris."),
        ("  Paris <think>x</think>", None, "  Paris <think>x</think>"),  # only a leading block counts
        ("<think>cut off by max_tok", "cut off by max_tok", ""),
        ("<thin", None, "<thin"),  # a marker's beginning that never completes is content
        ("", None, ""),
    ],
)
def test_a_leading_block_is_reasoning_and_the_rest_content(text, reasoning, content):
    assert split_reasoning(text, THINK) == (reasoning, content)


@pytest.mark.parametrize(
    "text",
    [
        "<think>\nstep one </thi nk> step two\n</think>\n\nThe answer <think> stays.",
        "  \n<think></think>answer",
        "no reasoning at all, <think> here is text",
        "<think>unfinished thought",
    ],
)
def test_a_stream_cut_anywhere_gives_the_same_split_as_the_whole_text(text):
    whole = split_reasoning(text, THINK)
    for size in (1, 2, 3, 7):
        stream = ReasoningStream(THINK)
        pieces = []
        for i in range(0, len(text), size):
            pieces += stream.feed(text[i : i + size])
        pieces += stream.finish()
        reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
        content = "".join(t for kind, t in pieces if kind == "content")
        assert (reasoning if whole[0] is not None else None, content) == whole, size
        assert all(t for _, t in pieces)  # no empty deltas
        assert not any(THINK[1] in t or THINK[0] in t for kind, t in pieces if kind == "reasoning")


def test_a_prompt_that_opens_the_block_starts_the_output_inside_it():
    markers = template_markers("{{ '<｜Assistant｜><think>\\n' }} ... {{ content.split('</think>')[-1] }}")
    assert markers == THINK
    assert opens_in_prompt("<｜User｜>Hi<｜Assistant｜><think>\n", markers)
    assert not opens_in_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n", markers)  # thinking off
    assert not opens_in_prompt("<|im_start|>assistant\n", markers)
    assert split_reasoning("I should greet.\n</think>\n\nHello!", markers, inside=True) == (
        "I should greet.\n",
        "Hello!",
    )


def test_a_template_naming_other_markers_uses_them():
    markers = template_markers("... <|START_THINKING|>{{ m.thinking }}<|END_THINKING|> ...")
    assert markers == ("<|START_THINKING|>", "<|END_THINKING|>")
    assert split_reasoning("<|START_THINKING|>hm<|END_THINKING|>ok", markers) == ("hm", "ok")
    assert split_reasoning("<think>hm</think>ok", markers) == (None, "<think>hm</think>ok")
    assert template_markers("{{ messages }}") == THINK  # the default pair


def test_reasoning_format_is_taken_from_flags_over_variables_over_the_file(tmp_path, monkeypatch):
    from serve.cli import add_arguments, serve_settings
    from serve.settings import Settings, load

    config = tmp_path / "serve.toml"
    config.write_text('reasoning_format = "none"\n')
    assert Settings().reasoning_format == "auto"
    assert load(config, environ={}).reasoning_format == "none"
    assert load(config, environ={"LLAMA_JAX_REASONING_FORMAT": "deepseek"}).reasoning_format == "deepseek"
    with pytest.raises(ValueError, match="reasoning_format"):
        load(environ={"LLAMA_JAX_REASONING_FORMAT": "hidden"})

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("LLAMA_JAX_REASONING_FORMAT", "none")
    assert serve_settings(parser.parse_args(["--config", str(config)])).reasoning_format == "none"
    flagged = parser.parse_args(["--config", str(config), "--reasoning-format", "auto"])
    assert serve_settings(flagged).reasoning_format == "auto"
