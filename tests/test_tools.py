"""Function calling without a model: tool validation, prompts, the forced-call grammar (with
the real tokenizer and llguidance) and parsing calls out of outputs, whole and streamed."""

from __future__ import annotations

import json
import time

import pytest

from llama_jax.constrain import MAX_GRAMMAR_CHARS, Grammar, GrammarCompiler
from llama_jax.errors import InvalidRequestError
from llama_jax.tools import (
    MAX_TOOLS,
    ToolCallStream,
    builtin_messages,
    check_tools,
    chosen_tools,
    parse_tool_calls,
    template_messages,
    tool_grammar,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def compiler(smollm_meta):
    from llama_jax.tokenizer import Tokenizer

    meta, path = smollm_meta
    tok = Tokenizer.from_gguf_metadata(meta, path)
    return GrammarCompiler(tok, tok.vocab_size), tok


def _accepts(compiler, grammar: Grammar, text: str) -> bool:
    comp, tok = compiler
    m = comp.matcher(grammar)
    return all(m.advance(t) for t in tok.encode(text, add_bos=False)) and m.closing_path(0, ()) == []


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "retrieval"}], "tools[0]"),
        ([{"type": "function", "function": {}}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "tools[0]"),
        ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)], "tools"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"description": "x" * 70_000}}}],
            "tools",
        ),
    ],
)
def test_bad_tools_are_invalid_requests_naming_the_field(tools, param):
    with pytest.raises(InvalidRequestError) as e:
        check_tools(tools)
    assert e.value.param == param


SLOW = {"type": "string", "pattern": "^(x{300}){300}$"}  # 47 bytes; ~35 ms a mask on 49k tokens


def test_grammars_whose_masks_are_slow_are_refused_naming_their_field(compiler):
    comp, _ = compiler
    for _ in range(2):  # the second time from the cache of refusals, at once
        start = time.perf_counter()
        with pytest.raises(InvalidRequestError, match="too complex.*allowed set") as e:
            comp.matcher(Grammar.json_schema(SLOW))
        assert e.value.param == "response_format"
    assert time.perf_counter() - start < 0.05
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"a": SLOW}, "required": ["a"]},
        },
    }
    with pytest.raises(InvalidRequestError, match="too complex") as e:
        comp.matcher(tool_grammar(check_tools([tool])))
    assert e.value.param == "tools"


def test_grammars_beyond_llguidance_limits_are_refused_and_sources_are_capped(compiler):
    comp, _ = compiler
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError, match="too complex") as e:
        comp.matcher(Grammar.json_schema({"type": "string", "pattern": "^(x{1000}){1000}$"}))
    assert e.value.param == "response_format" and time.perf_counter() - start < 1.5
    with pytest.raises(InvalidRequestError, match=str(MAX_GRAMMAR_CHARS)) as e:
        Grammar.json_schema({"type": "string", "description": "x" * MAX_GRAMMAR_CHARS})
    assert e.value.param == "response_format"
    comp.matcher(Grammar.json_schema({"type": "object", "properties": {"a": {"type": "string"}}}))


def test_tool_choice_modes_and_errors():
    tools = check_tools([WEATHER, TIME])
    assert chosen_tools(tools, None) == ("auto", tools)
    assert chosen_tools([], None) == ("none", [])
    assert chosen_tools(tools, "required") == ("required", tools)
    mode, allowed = chosen_tools(tools, {"type": "function", "function": {"name": "get_time"}})
    assert mode == "required" and [t["function"]["name"] for t in allowed] == ["get_time"]
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, {"function": {}}):
        with pytest.raises(InvalidRequestError) as e:
            chosen_tools(tools, bad)
        assert e.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError):
        chosen_tools([], "required")


def test_forced_call_grammar_accepts_valid_calls_only(compiler):
    tools = check_tools([WEATHER, TIME])
    one = tool_grammar(tools, parallel=False)
    many = tool_grammar(tools, parallel=True)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    other = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert _accepts(compiler, one, call)
    assert _accepts(compiler, many, call + "\n" + other)
    assert not _accepts(compiler, one, call + "\n" + other)
    # a missing required argument, an unknown tool, an extra argument, a value outside the enum
    assert not _accepts(compiler, one, call.replace(', "unit": "celsius"', ""))
    assert not _accepts(compiler, one, call.replace("get_weather", "get_news"))
    assert not _accepts(compiler, one, call.replace('"Paris"', '"Paris", "x": 1'))
    assert not _accepts(compiler, one, call.replace("celsius", "kelvin"))


def test_builtin_prompt_lists_tools_and_renders_the_round_trip():
    tools = check_tools([WEATHER])
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    ]
    out = builtin_messages(messages, tools)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert json.dumps(tools[0]) in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    }
    assert out[3] == {"role": "user", "content": '<tool_response>\n{"temp": 3}\n</tool_response>'}
    assert builtin_messages(messages[1:2], tools)[0]["role"] == "system"  # added when there was none
    parts = [{**messages[2], "content": [{"type": "text", "text": "Checking."}]}]  # content as text parts
    assert builtin_messages(parts, [])[0]["content"].startswith("Checking.\n<tool_call>")
    # templates that know tools get the arguments as objects (they serialize them with tojson)
    assert template_messages(messages)[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}


OUTPUTS = [
    ("Just an answer, with <b>tags</b> and a < sign.", [], "Just an answer, with <b>tags</b> and a < sign."),
    (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris\\"", "n": [1, {"a": 2}]}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        [("get_weather", {"city": 'Pa}ris"', "n": [1, {"a": 2}]}), ("get_time", {})],
        "",
    ),
    (
        'Let me check. <tool_call>{"arguments": {"x": 1}, "name": "get_time"}</tool_call>',
        [("get_time", {"x": 1})],
        "Let me check.",
    ),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', [("get_weather", {"city": "Rome"})], ""),
    (
        '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "A"}}',
        [("get_time", {}), ("get_weather", {"city": "A"})],
        "",
    ),
    (  # a closing tag inside a string is text (a forced call's grammar allows it there)
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC}}</tool_call>\\"x"}}\n</tool_call>',
        [("get_time", {"tz": 'UTC}}</tool_call>"x'})],
        "",
    ),
    ('{"not": "a call"}', [], '{"not": "a call"}'),
    ("<tool_call>not json</tool_call> after", [], "<tool_call>not json</tool_call> after"),
]


@pytest.mark.parametrize(("text", "calls", "content"), OUTPUTS)
def test_calls_are_parsed_from_hermes_qwen_and_llama_outputs(text, calls, content):
    got_content, got = parse_tool_calls(text)
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert got_content == content
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


@pytest.mark.parametrize(("text", "calls", "content"), OUTPUTS)
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_streamed_pieces_reassemble_to_the_whole_parse(text, calls, content, step):
    stream = ToolCallStream()
    pieces = []
    for i in range(0, len(text), step):
        pieces += stream.feed(text[i : i + step])
    pieces += stream.finish()
    assert "".join(p[1] for p in pieces if p[0] == "content") == content
    rebuilt: dict[int, dict] = {}
    for p in pieces:
        if p[0] == "call":
            entry = rebuilt.setdefault(p[1], {"name": None, "arguments": ""})
            if "id" in p[2]:
                assert entry["name"] is None, "a call is announced once"
                entry["name"] = p[2]["function"]["name"]
                entry["id"] = p[2]["id"]
            entry["arguments"] += p[2]["function"]["arguments"]
    assert [(e["name"], json.loads(e["arguments"])) for e in rebuilt.values()] == calls
    assert [e["id"] for e in rebuilt.values()] == [c.id for c in stream.calls]


def test_a_call_streams_its_arguments_as_they_are_generated():
    stream = ToolCallStream()
    head = stream.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert head[0][2]["function"]["name"] == "get_weather"
    assert head[1][2]["function"]["arguments"] == '{"ci'
    assert stream.feed('ty": "Oslo"}')[0][2]["function"]["arguments"] == 'ty": "Oslo"}'
    assert stream.feed("}\n</tool_call>") == []  # the call's own closing brace is not an argument
    assert json.loads(stream.calls[0].arguments) == {"city": "Oslo"}


def test_only_allowed_tools_are_calls():
    content, calls = parse_tool_calls(
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', {"get_time"}
    )
    assert calls == [] and "rm_rf" in content
