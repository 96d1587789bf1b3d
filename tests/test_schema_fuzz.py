"""Schema fuzzing of the live server (the session `server`: real hypercorn, the default model)
with schemathesis, from the server's own `/openapi.json`: every operation, positive and
negative cases. Each response must not be a 5xx, must match the documented schema (a stream
event by event), every error must be an OpenAI error object, and each response must come
within its time bound. Generation lengths, `n` and list sizes are capped so CI stays fast."""

from __future__ import annotations

import json
import os
import time
import zlib

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from serve import openapi
from serve.settings import Settings

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("LLAMA_JAX_FUZZ_EXAMPLES", "12"))  # per operation and mode
RESPONSE_SECONDS = 30.0  # a capped generation on 2 slow cores, with a first compile, fits easily
SERVED = ("smollm", "my-model", "smollm2-135m-instruct")


# Built here, from the same models the server builds its /openapi.json from (a test in
# test_openapi.py pins that they are equal), so the operations are known at collection time.
SCHEMA = schemathesis.openapi.from_dict(openapi.build(Settings()))
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}


def _cap(body: object) -> None:
    """Keep a generated request small: few tokens, few samples, few prompts. Only values that
    are already valid are changed, and to valid values, so negative cases stay negative."""
    if not isinstance(body, dict):
        return
    for key, most in (
        ("max_tokens", 3),
        ("max_completion_tokens", 3),
        ("max_output_tokens", 3),
        ("n", 2),
        ("top_logprobs", 3),
    ):
        if type(body.get(key)) is int and body[key] > most:
            body[key] = most
    if ("messages" in body or "prompt" in body) and "max_completion_tokens" not in body:
        body.setdefault("max_tokens", 2)
    if "input" in body:  # the Responses API's (an embedding request ignores the field)
        body.setdefault("max_output_tokens", 2)
    for key in ("prompt", "input", "messages"):
        if isinstance(body.get(key), list) and len(body[key]) > 3:
            body[key] = body[key][:3]
    if isinstance(body.get("model"), str) and zlib.crc32(body["model"].encode()) % 4:
        body["model"] = SERVED[zlib.crc32(body["model"].encode()) % 3]  # mostly a served model


def _stream_events(text: str) -> list[str]:
    """The `data:` of each event; an `event:` line before it (the Responses API's) must name
    the data's `type`."""
    assert text.endswith("\n\n"), f"a stream must end with a blank line: {text[-200:]!r}"
    out = []
    for e in (e for e in text.split("\n\n") if e):
        kind = None
        if e.startswith("event: "):
            line, e = e.split("\n", 1)
            kind = line.removeprefix("event: ")
        assert e.startswith("data: "), e[:200]
        data = e.removeprefix("data: ")
        assert kind is None or json.loads(data)["type"] == kind, e[:200]
        out.append(data)
    return out


CHUNKS = {
    "/v1/chat/completions": "ChatCompletionChunk",
    "/v1/completions": "Completion",
    "/v1/responses": "ResponseStreamEvent",
}


def _validator(components: dict, name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({**components, "$ref": f"#/components/schemas/{name}"})


@schemathesis.check
def openai_error_objects_and_valid_streams(ctx, response, case):
    """Every error is `{"error": {message, type, param, code}}` (code a string or null); a stream
    is `data:` events of the documented chunk, then `[DONE]` or an error event."""
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        err = body["error"]
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str) and err["type"], err
        assert err["param"] is None or isinstance(err["param"], str), err
        assert err["code"] is None or isinstance(err["code"], str), err
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        components = {"components": case.operation.schema.raw_schema["components"]}
        chunk = _validator(components, CHUNKS[case.operation.path])
        events = _stream_events(response.text)
        for data in events[:-1]:
            chunk.validate(json.loads(data))
        last = json.loads(events[-1]) if events[-1] != "[DONE]" else None
        if last is not None and "error" in last:  # a stream that failed midway ends with an error event
            _validator(components, "ErrorResponse").validate(last)
        elif last is not None:
            chunk.validate(last)
            # A stream read in whole (not cut at schemathesis's event limit or timeout) ends with
            # [DONE], or for the Responses API with the whole response.
            if not getattr(response, "stream_cut_short", False):
                assert case.operation.path == "/v1/responses", events[-1][:200]
                assert last["type"] in ("response.completed", "response.incomplete"), last["type"]
    return None


def _cases() -> list:
    out = []
    for label, op in OPERATIONS.items():
        out.append(pytest.param(label, GenerationMode.POSITIVE, id=f"{label} positive"))
        if op.body or op.query:  # a path parameter is any string: nothing to make invalid
            out.append(pytest.param(label, GenerationMode.NEGATIVE, id=f"{label} negative"))
    return out


@pytest.mark.parametrize(("label", "mode"), _cases())
def test_every_operation_answers_without_5xx_and_as_documented(server, label, mode):
    operation = OPERATIONS[label]
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
        openai_error_objects_and_valid_streams,
    ]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case):
        _cap(case.body)
        start = time.monotonic()
        response = case.call(base_url=server.url, timeout=RESPONSE_SECONDS + 5)
        elapsed = time.monotonic() - start
        case.validate_response(response, checks=checks)
        assert elapsed < RESPONSE_SECONDS, f"{label} took {elapsed:.1f} s"

    run()
