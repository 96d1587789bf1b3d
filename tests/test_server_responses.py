"""`POST /v1/responses` on the tiny model served by a real hypercorn (`tiny_server`), through
the official client's `client.responses.create`: input as text or items, instructions,
max_output_tokens, text.format, function tools and the call / output round trip, the typed
stream; and the output items built from a reasoning block (no server: the tiny model cannot
be made to write one through this API)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from llama_jax.generator import PreparedChat
from serve.handlers.responses import _Output
from serve.output import OutputReader

MODEL = "tiny"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(api_key="not-needed", base_url=tiny_server.base_url, max_retries=0)


def test_text_input_and_instructions_are_the_chat_prompt(client):
    r = client.responses.create(
        model=MODEL, input="Hi", instructions="Be brief.", max_output_tokens=6, temperature=0
    )
    c = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
    )
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.usage.input_tokens == c.usage.prompt_tokens
    assert r.output_text == c.choices[0].message.content
    assert [i.type for i in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    if c.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 6
    assert r.instructions == "Be brief." and r.store is False


def test_message_items_and_a_call_round_trip_are_the_chat_conversation(client):
    args = '{"city": "Paris", "unit": "c"}'
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": args},
        {"type": "function_call_output", "call_id": "call_1", "output": "22 C, sunny"},
    ]
    messages = [
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    ]
    r = client.responses.create(model=MODEL, input=items, tools=[WEATHER], max_output_tokens=2)
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    c = client.chat.completions.create(model=MODEL, messages=messages, tools=[chat_tool], max_tokens=2)
    assert r.usage.input_tokens == c.usage.prompt_tokens


def test_text_format_json_schema_constrains_the_output(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = client.responses.create(
        model=MODEL,
        input="A number, as JSON",
        max_output_tokens=40,
        temperature=1.0,
        text={"format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}},
    )
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_a_required_function_call_is_a_function_call_item_streamed_or_not(client):
    kwargs = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER], tool_choice="required")
    r = client.responses.create(max_output_tokens=200, temperature=0, **kwargs)
    calls = [i for i in r.output if i.type == "function_call"]
    assert calls and r.status == "completed", r.output
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

    events = list(client.responses.create(max_output_tokens=200, temperature=0, stream=True, **kwargs))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == "".join(done) == "".join(c.arguments for c in calls)
    final = events[-1].response
    assert [i.name for i in final.output] == [c.name for c in calls]


def test_the_stream_is_typed_numbered_events_ending_in_the_whole_response(client):
    kwargs = dict(model=MODEL, input="Hi", max_output_tokens=8, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text == whole.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_previous_response_id_is_refused_as_this_server_is_stateless(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_abc")
    assert e.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_image"}]}])
    assert e.value.status_code == 400


def test_a_reasoning_block_becomes_a_reasoning_item_before_the_message():
    prep = PreparedChat([], None, "none", frozenset())
    out = _Output({"output": []}, OutputReader(prep, split_reasoning=True))
    events = [
        out.feed("<thi"),
        out.feed("nk>Two and"),
        out.feed(" two.</th"),
        out.feed("ink>\n\nFour.", True),
    ]
    out.finish("stop", 5, 9, 0, 3)
    kinds = [json.loads(e.split(b"data: ", 1)[1])["type"] for batch in events for e in batch]
    kinds += [json.loads(e.split(b"data: ", 1)[1])["type"] for e in out.closing]
    assert kinds[:3] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
    ]
    assert "response.reasoning_text.done" in kinds and kinds[-1] == "response.completed"
    reasoning, message = out.response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [
        {"type": "reasoning_text", "text": "Two and two."}
    ]
    assert message["type"] == "message" and message["content"][0]["text"] == "Four."
    assert out.response["usage"]["output_tokens_details"] == {"reasoning_tokens": 3}
