"""Tests for serve/openapi.py and serve/handlers/docs.py: the OpenAPI 3.1 description served at
/openapi.json (valid, generated from the models, complete) and its page at /docs; what the
official `openai` client really sends validates against it, and what the server answers too."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31

from serve import openapi, schemas
from serve.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spec(server) -> dict:
    r = httpx.get(server.url + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    return r.json()


def validator(spec: dict, name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"components": spec["components"], "$ref": f"#/components/schemas/{name}"}
    )


def test_description_is_valid_openapi_3_1_and_lists_every_route(server, spec):
    jsonschema.Draft202012Validator(OPENAPI_31).validate(spec)
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert spec["openapi"] == "3.1.0"
    assert spec == json.loads(json.dumps(openapi.build(Settings())))  # the session server's settings
    routes = {r.rule.replace("<path:", "<") for r in _app_rules() if r.endpoint != "static"}
    assert routes == {p.replace("{", "<").replace("}", ">") for p in spec["paths"]}


def _app_rules():
    from serve.app import create_app

    return list(create_app(Settings()).url_map.iter_rules())


def test_request_bodies_are_generated_from_the_pydantic_models(spec):
    for name in (
        "ChatCompletionRequest",
        "CompletionRequest",
        "EmbeddingRequest",
        "TokenizeRequest",
        "ResponsesRequest",
    ):
        model = getattr(schemas, name)
        assert set(spec["components"]["schemas"][name]["properties"]) == set(model.model_fields)
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["required"] == ["model", "messages"]
    # An explicit null means "the default", as the server reads it.
    validator(spec, "ChatCompletionRequest").validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": None, "n": None}
    )


class Recorder:
    """The JSON bodies the official client really sends (an httpx request hook)."""

    def __init__(self):
        self.bodies: list[tuple[str, dict]] = []

    def __call__(self, request: httpx.Request) -> None:
        if request.method == "POST":
            self.bodies.append((request.url.path, json.loads(request.content)))


def recorded_client(server) -> tuple[openai.OpenAI, Recorder]:
    """The official client against `server`, with every request body it sends recorded."""
    rec = Recorder()
    http = httpx.Client(event_hooks={"request": [rec]})
    return openai.OpenAI(base_url=server.base_url, api_key="none", http_client=http, max_retries=0), rec


def test_the_official_client_requests_and_the_answers_validate(server, spec):
    client, rec = recorded_client(server)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    answers = {
        "ChatCompletion": [
            client.chat.completions.create(model="smollm", messages=messages, max_tokens=3),
            client.chat.completions.create(
                model="smollm",
                messages=messages,
                max_completion_tokens=3,
                temperature=0.5,
                top_p=0.9,
                n=2,
                stop=["\n", "Paris"],
                seed=1,
                presence_penalty=0.5,
                frequency_penalty=-0.5,
                logit_bias={"42": -100},
                logprobs=True,
                top_logprobs=2,
                user="u",
                extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1},
            ),
        ],
        "Completion": [
            client.completions.create(model="smollm", prompt="The capital of France is", max_tokens=2),
            client.completions.create(model="smollm", prompt=["a", "b"], max_tokens=2, echo=True),
            client.completions.create(model="smollm", prompt=[1, 2, 3], max_tokens=2, logprobs=2),
        ],
        "EmbeddingList": [
            client.embeddings.with_raw_response.create(model="smollm", input="hi").parse(),
            client.embeddings.create(model="smollm", input=["a", "b"], encoding_format="float"),
        ],
        "ModelList": [client.models.list()],
        "ModelCard": [client.models.retrieve("smollm")],
    }
    chunks = list(
        client.chat.completions.create(
            model="smollm",
            messages=messages,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    list(client.completions.create(model="smollm", prompt="Hi", max_tokens=2, stream=True))
    try:  # tools are being added; here only the request's shape matters
        client.chat.completions.create(
            model="smollm",
            messages=messages,
            max_tokens=3,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            tool_choice="auto",
        )
    except openai.BadRequestError:
        pass
    request_schema = {
        "/v1/chat/completions": "ChatCompletionRequest",
        "/v1/completions": "CompletionRequest",
        "/v1/embeddings": "EmbeddingRequest",
    }
    posted = [(p, b) for p, b in rec.bodies if p in request_schema]
    assert len(posted) == 10
    for path, body in posted:
        validator(spec, request_schema[path]).validate(body)
    for name, objects in answers.items():
        for obj in objects:
            validator(spec, name).validate(obj.model_dump(mode="json", exclude_unset=True))
    for chunk in chunks:
        validator(spec, "ChatCompletionChunk").validate(chunk.model_dump(mode="json", exclude_unset=True))


def test_docs_page_is_self_contained(server, spec):
    r = httpx.get(server.url + "/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "http" not in csp
    page = r.text
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    for path in spec["paths"]:
        assert f"<code>{path}</code>" in page
    for name in spec["components"]["schemas"]:
        assert f'id="schema-{name}"' in page


def test_the_official_clients_responses_requests_and_events_validate(server, spec):
    client, rec = recorded_client(server)
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False}
    answers = [
        client.responses.create(model="smollm", input="Hi", instructions="Be brief.", max_output_tokens=3),
        client.responses.create(
            model="smollm",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            max_output_tokens=3,
            temperature=0.5,
            top_p=0.9,
            tools=[tool],
            tool_choice="auto",
            text={"format": {"type": "json_object"}},
            metadata={"k": "v"},
        ),
    ]
    events = list(client.responses.create(model="smollm", input="Hi", max_output_tokens=3, stream=True))
    for path, body in rec.bodies:
        assert path == "/v1/responses"
        validator(spec, "ResponsesRequest").validate(body)
    for answer in answers:
        validator(spec, "ResponseObject").validate(answer.model_dump(mode="json", exclude_unset=True))
    for e in events:
        validator(spec, "ResponseStreamEvent").validate(e.model_dump(mode="json", exclude_unset=True))
