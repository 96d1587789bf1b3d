"""Function calling and structured output over HTTP with the default model and the official
`openai` client: JSON mode, JSON schemas, forced and automatic tool calls, streamed tool-call
deltas and the full call / result / answer loop."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

MODEL = "smollm2-135m-instruct"

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["engineer", "artist", "doctor"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "skills": {
            "type": "array",
            "items": {"type": "string", "maxLength": 30},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "role", "address", "skills"],
}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key="not-needed", base_url=server.base_url, max_retries=0)


@pytest.fixture(scope="module")
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="not-needed", base_url=server.base_url, max_retries=0)


def twenty(client, **kwargs) -> list:
    """20 sampled choices at temperature 1.0: two requests of n=10 (different seeds)."""
    choices = []
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL, n=10, temperature=1.0, seed=seed, **kwargs)
        choices += r.choices
    return choices


def test_json_object_parses_every_time(client):
    messages = [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": "Describe a cat as a JSON object with its name and age."},
    ]
    choices = twenty(client, messages=messages, response_format={"type": "json_object"}, max_tokens=60)
    for c in choices:
        assert isinstance(json.loads(c.message.content), dict), c.message.content
        assert c.finish_reason == "stop"


def test_json_schema_output_validates_every_time(client):
    messages = [{"role": "user", "content": "Invent a person who lives in a city. Reply in JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    choices = twenty(client, messages=messages, response_format=fmt, max_tokens=100)
    for c in choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_streaming_with_a_schema_gives_the_same_json(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kwargs = dict(
        model=MODEL, messages=[{"role": "user", "content": "A person, in JSON."}], response_format=fmt
    )
    kwargs.update(max_tokens=100, temperature=0.8, seed=11)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kwargs)
        if c.choices
    ]
    assert "".join(parts) == whole and len(parts) > 3
    jsonschema.validate(json.loads(whole), PERSON)


def test_a_named_tool_choice_always_calls_that_tool_with_valid_arguments(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        n=8,
        temperature=1.0,
        seed=1,
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        assert c.message.content is None
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_with_two_tools_calls_one_of_them(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        n=4,
        temperature=1.0,
        seed=4,
    )
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0].function
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_tool_call_round_trip_reaches_an_answer(client):
    """The usual client loop: the model calls a tool, the client runs it, the model answers."""
    messages = list(ASK_WEATHER)
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=60
    )
    call = first.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append(
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"city": args["city"], "temperature": 21}),
        }
    )
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40
    )
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.content and not answer.message.tool_calls
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were in the prompt


def test_streamed_tool_call_deltas_reassemble_to_the_call(client):
    kwargs = dict(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice="required",
        temperature=0.9,
        seed=21,
        max_tokens=80,
    )
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    fragments = 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert entry["id"] is None  # id, type and name come once, first
                    entry.update(id=d.id, name=d.function.name)
                    assert d.type == "function"
                entry["arguments"] += d.function.arguments or ""
                fragments += 1
    assert reasons[-1] == "tool_calls"
    got = [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
    want = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert got == want
    assert fragments > 2 * len(got)  # the arguments arrived in pieces, as they were generated


def test_auto_tool_choice_answers_or_calls(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=60
    )
    c = r.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls"
        assert c.message.tool_calls[0].function.name == "get_weather"
    else:
        assert c.message.content and "<tool_call>" not in c.message.content


def test_constrained_and_free_requests_run_together(aclient):
    async def go():
        free = aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi."}], temperature=0, max_tokens=20
        )
        constrained = aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "A person, in JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
            temperature=1.0,
            max_tokens=100,
        )
        return await asyncio.gather(free, constrained)

    free, constrained = asyncio.run(go())
    jsonschema.validate(json.loads(constrained.choices[0].message.content), PERSON)
    assert free.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_invalid_schemas_and_tool_choices_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=5, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
