"""Structured output beyond JSON and reasoning output over HTTP, on the tiny model served by a
real hypercorn (`tiny_server`), through the official `openai` client: vLLM's
`structured_outputs` and `guided_*`, llama.cpp's `json_schema` and `grammar`, their 400s;
`chat_template_kwargs`, and a reasoning block as `reasoning_content` (streamed or not) or
inline with `reasoning_format: none`. The tiny model writes gibberish, so every assertion on
text is one a grammar guarantees."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

MODEL = "tiny"
HI = [{"role": "user", "content": "Hi"}]
WORDS = r"[a-z]{2,8}-[0-9]{1,3}"
THINK = r"<think>[a-z]{3,10}</think>\n\n[a-z]{3,10}"


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(api_key="not-needed", base_url=tiny_server.base_url, max_retries=0)


def chat(client, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=HI, **{"max_tokens": 40, **kwargs})


def test_chat_samples_follow_a_regex_a_choice_or_a_lark_grammar(client):
    cases = [
        ({"structured_outputs": {"regex": WORDS}}, lambda t: re.fullmatch(WORDS, t)),
        ({"guided_regex": WORDS}, lambda t: re.fullmatch(WORDS, t)),
        (
            {"structured_outputs": {"choice": ["red", "green", "dark blue"]}},
            lambda t: t in ("red", "green", "dark blue"),
        ),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        (
            {"structured_outputs": {"grammar": 'start: ("ab" | "cd")+ "!"'}},
            lambda t: re.fullmatch(r"(ab|cd)+!", t),
        ),
    ]
    for extra, ok in cases:
        r = chat(client, n=4, temperature=1.0, seed=7, extra_body=extra)
        texts = [c.message.content for c in r.choices]
        assert all(ok(t) for t in texts), (extra, texts)
        assert {c.finish_reason for c in r.choices} == {"stop"}, extra


def test_completions_take_llama_cpp_json_schema_and_gbnf_and_vllm_json(client):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
    }
    for extra in ({"json_schema": schema}, {"structured_outputs": {"json": schema}}, {"guided_json": schema}):
        r = client.completions.create(
            model=MODEL, prompt="Data:", max_tokens=60, temperature=1.0, extra_body=extra
        )
        jsonschema.validate(json.loads(r.choices[0].text), schema)
    gbnf = 'root ::= ("yes" | "no") " " [0-9]{1,3} "."'
    r = client.completions.create(
        model=MODEL, prompt="Answer:", max_tokens=20, n=3, extra_body={"grammar": gbnf}
    )
    assert all(re.fullmatch(r"(yes|no) [0-9]{1,3}\.", c.text) for c in r.choices), [c.text for c in r.choices]


def test_a_streamed_constrained_output_matches_too(client):
    stream = client.completions.create(
        model=MODEL, prompt="x", max_tokens=30, stream=True, extra_body={"guided_regex": WORDS}
    )
    assert re.fullmatch(WORDS, "".join(c.choices[0].text for c in stream if c.choices))


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/chat/completions", {"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
        ("/chat/completions", {"grammar": "root ::= ("}, "grammar"),
        ("/completions", {"grammar": 'start: "lark is not gbnf"'}, "grammar"),
        (
            "/chat/completions",
            {"structured_outputs": {"grammar": "start: undefined"}},
            "structured_outputs.grammar",
        ),
        ("/completions", {"guided_json": "{not json"}, "guided_json"),
        ("/completions", {"guided_choice": []}, "guided_choice"),
        ("/completions", {"guided_regex": "^(x{300}){300}$"}, "guided_regex"),  # too costly a mask
        ("/completions", {"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'}, "grammar"),
        (
            "/chat/completions",
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "guided_regex",
        ),
        ("/chat/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ("/chat/completions", {"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
        ("/chat/completions", {"reasoning_format": "hidden"}, "reasoning_format"),
    ],
)
def test_bad_grammars_are_400s_naming_the_field(tiny_server, path, extra, param):
    body = {"model": MODEL, "max_tokens": 5, **extra}
    body |= {"messages": HI} if path == "/chat/completions" else {"prompt": "x"}
    r = httpx.post(tiny_server.base_url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_a_reasoning_block_is_reasoning_content_streamed_or_not(client):
    extra = {"structured_outputs": {"regex": THINK}}
    msg = chat(client, temperature=0, extra_body=extra).choices[0].message
    assert re.fullmatch(r"[a-z]{3,10}", msg.reasoning_content), msg
    assert re.fullmatch(r"[a-z]{3,10}", msg.content), msg  # the blank line after the block is dropped

    reasoning, content = [], []
    for chunk in chat(client, temperature=0, stream=True, extra_body=extra):
        for choice in chunk.choices:
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            content.append(choice.delta.content or "")
            assert "<" not in reasoning[-1] + content[-1]  # no marker, or piece of one, leaks out
    assert ("".join(reasoning), "".join(content)) == (msg.reasoning_content, msg.content)


def test_reasoning_format_none_keeps_the_block_in_content(client):
    extra = {"structured_outputs": {"regex": THINK}, "reasoning_format": "none"}
    msg = chat(client, temperature=0, extra_body=extra).choices[0].message
    assert re.fullmatch(THINK, msg.content), msg
    assert getattr(msg, "reasoning_content", None) is None


def test_chat_template_kwargs_reach_the_template(client, tiny_server):
    def prompt_tokens(**extra) -> int:
        return chat(client, max_tokens=1, extra_body=extra).usage.prompt_tokens

    block = httpx.post(
        tiny_server.url + "/tokenize", json={"content": "<think>\n\n</think>\n\n"}, timeout=30
    ).json()["tokens"]
    plain = prompt_tokens()
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": True}) == plain
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) == plain + len(block)
