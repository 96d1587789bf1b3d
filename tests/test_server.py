"""The OpenAI-compatible server, over real HTTP: hypercorn on a loopback port serving the
default model, driven by the official `openai` client (sync and async), `httpx` and curl."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import shutil
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key="not-needed", base_url=server.base_url, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_slots_free(http: httpx.Client, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        slots = http.get("/slots").json()
        if not any(s["is_processing"] for s in slots) or time.monotonic() > deadline:
            return slots
        time.sleep(0.1)


# -- health, models, ids -----------------------------------------------------------------------


def test_health_reports_loading_then_ok(server, http):
    assert 503 in server.statuses and server.statuses[-1] == 200  # 503 "loading" while the model loaded
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert r.headers["x-request-id"]


def test_models_lists_the_model_and_its_aliases(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "smollm", "my-model"]
    m = client.models.retrieve("my-model")
    assert m.id == "my-model" and m.object == "model" and m.owned_by == "llama-jax"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"


def test_request_id_is_echoed_or_generated(http):
    assert http.get("/v1/models", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = {http.get("/v1/models").headers["x-request-id"] for _ in range(2)}
    assert len(generated) == 2


# -- chat --------------------------------------------------------------------------------------


def test_chat_answers_with_openai_shape(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.system_fingerprint and abs(r.created - time.time()) < 120
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_alias_is_answered_under_its_own_name(client):
    r = client.chat.completions.create(model="my-model", messages=FRANCE, temperature=0, max_tokens=2)
    assert r.model == "my-model"


def test_the_single_model_answers_any_name_and_the_response_names_it(client):
    """llama.cpp's way: a client with a hard-coded model name works; the response says which
    model answered. Listing stays exact: retrieving an unknown name is a 404."""
    r = client.chat.completions.create(model="gpt-4o", messages=FRANCE, temperature=0, max_tokens=8)
    assert r.model == MODEL and "Paris" in r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=FRANCE, max_tokens=2, stream=True))
    assert {c.model for c in chunks} == {MODEL}
    assert client.completions.create(model="davinci-002", prompt="Hi", max_tokens=2).model == MODEL
    assert client.embeddings.create(model="text-embedding-3-small", input="Hi").model == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_stream_equals_non_stream_and_usage_only_when_asked(client):
    kw = dict(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full


def test_stream_wire_format_ends_with_done(http):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 4, "stream": True}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["choices"][0]["delta"] == {}


def test_n_samples_are_distinct_choices(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        n=2,
        temperature=1.0,
        seed=7,
        max_tokens=12,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens == 24  # counted over both choices
    assert r.choices[0].message.content != r.choices[1].message.content


def test_n_streams_every_choice(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=FRANCE, n=2, temperature=1.0, seed=3, max_tokens=6, stream=True
        )
    )
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_logprobs_are_openai_shaped_and_finite(client):
    r = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens or len(content) == r.usage.completion_tokens - 1
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert math.isfinite(t.logprob) and t.logprob <= 0
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely


def test_stop_string_is_excluded(client):
    base = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=24)
    text = base.choices[0].message.content
    assert "Paris" in text
    r = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=24, stop=["Paris"]
    )
    assert r.choices[0].message.content == text[: text.index("Paris")]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproduces_the_same_sample(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16)
    a = client.chat.completions.create(seed=1234, temperature=1.0, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, temperature=1.0, **kw).choices[0].message.content
    others = {
        client.chat.completions.create(seed=s, temperature=1.0, **kw).choices[0].message.content
        for s in (1, 2, 3)
    }
    assert a == b
    assert len(others | {a}) > 1


def test_multi_turn_reuses_the_prefix_cache(client):
    turn1 = FRANCE
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, temperature=0, max_tokens=8)
    turn2 = turn1 + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "And of Germany?"},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, temperature=0, max_tokens=4)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 1


def test_message_roles_and_text_parts(client):
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the capital"},
                {"type": "text", "text": "of France?"},
            ],
        },
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Thanks!"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, user="u1")
    assert r.choices[0].message.content is not None


def test_extensions_and_sampling_fields_are_accepted(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        max_completion_tokens=5,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"0": -100},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


# -- legacy completions ------------------------------------------------------------------------


def test_completions_echo_and_several_prompts(client):
    r = client.completions.create(
        model=MODEL, prompt=["Once upon a time", "The sky is"], max_tokens=4, temperature=0, echo=True
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("Once upon a time") and r.choices[1].text.startswith("The sky is")
    assert len(r.choices[0].text) > len("Once upon a time")


def test_completions_stream_and_logprobs(client):
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    full = client.completions.create(logprobs=2, **kw)
    lp = full.choices[0].logprobs
    assert "".join(lp.tokens) == full.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_completions_accept_token_ids(client, http):
    ids = http.post("/tokenize", json={"content": "The capital of France is"}).json()["tokens"]
    a = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0).choices[0].text
    b = (
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
        .choices[0]
        .text
    )
    assert a == b


# -- embeddings, tokenize ----------------------------------------------------------------------


def test_embeddings_float_and_base64_agree(client, http):
    r = client.embeddings.create(model=MODEL, input=["Hello", "world"])  # the client asks for base64
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (2, 576) and [d.index for d in r.data] == [0, 1]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    raw = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": "Hello", "encoding_format": "base64"}
    ).json()
    b64 = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    floats = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": "Hello", "encoding_format": "float"}
    ).json()
    np.testing.assert_allclose(b64, floats["data"][0]["embedding"], rtol=1e-6)
    np.testing.assert_allclose(b64, vecs[0], rtol=1e-5, atol=1e-6)
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0


def test_embeddings_of_token_ids_match_text(http):
    ids = http.post("/tokenize", json={"content": "The quick brown fox"}).json()["tokens"]
    by_ids = http.post("/v1/embeddings", json={"model": MODEL, "input": [ids], "encoding_format": "float"})
    by_text = http.post(
        "/v1/embeddings", json={"model": MODEL, "input": "The quick brown fox", "encoding_format": "float"}
    )
    np.testing.assert_allclose(
        by_ids.json()["data"][0]["embedding"], by_text.json()["data"][0]["embedding"], rtol=1e-5, atol=1e-6
    )


def test_tokenize_round_trip_and_template(http):
    text = "Hello, world! Ünïcödé 🙂"
    toks = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert all(set(t) == {"id", "piece"} for t in toks)
    back = http.post("/detokenize", json={"tokens": [t["id"] for t in toks]}).json()
    assert back == {"content": text}
    prompt = http.post("/apply-template", json={"messages": FRANCE}).json()["prompt"]
    assert "What is the capital of France?" in prompt and prompt.rstrip().endswith("assistant")


def test_tokenize_takes_vllms_prompt_and_messages(http, client):
    plain = http.post("/tokenize", json={"content": "Hello world"}).json()
    assert plain == {"tokens": plain["tokens"]}  # llama.cpp's shape stays as it was
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert r == {"tokens": [1, *plain["tokens"]], "count": len(plain["tokens"]) + 1, "max_model_len": 512}
    r = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert r["tokens"] == plain["tokens"]
    chat = http.post("/tokenize", json={"messages": FRANCE}).json()
    usage = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1).usage
    assert chat["count"] == len(chat["tokens"]) == usage.prompt_tokens  # what generation reads
    r = http.post("/tokenize", json={"messages": FRANCE, "add_generation_prompt": False}).json()
    assert r["count"] < chat["count"]
    for body in ({"content": "a", "prompt": "b"}, {}, {"messages": []}):
        bad = http.post("/tokenize", json=body)
        assert bad.status_code == 400 and error_of(bad)["type"] == "invalid_request_error"


def test_version_and_props(http):
    import llama_jax

    assert http.get("/version").json() == {"version": llama_jax.__version__}
    props = http.get("/props").json()
    assert props["total_slots"] == 4 and props["model_alias"] == MODEL
    assert props["default_generation_settings"] == {
        "n_ctx": 512,
        "params": {
            "temperature": 0.7,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "n_predict": 256,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "repeat_penalty": 1.0,
        },
    }
    assert "<|im_start|>" in props["chat_template"] and props["eos_token"] == "<|im_end|>"
    assert (
        props["model_path"].endswith(".gguf") and props["build_info"] == f"llama-jax {llama_jax.__version__}"
    )
    assert http.get("/props", params={"model": "my-model"}).json()["model_alias"] == MODEL


# -- errors ------------------------------------------------------------------------------------


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str)
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": FRANCE}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": FRANCE, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": FRANCE, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": FRANCE, "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "messages": FRANCE, "n": 0}, "n"),
        ({"model": MODEL, "messages": FRANCE, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": FRANCE, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"model": MODEL, "messages": FRANCE, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"model": MODEL, "messages": FRANCE, "logit_bias": {"5": 500}}, "logit_bias.5"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0]"),
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": FRANCE, "stop": [1, 2]}, "stop"),
    ],
)
def test_bad_fields_get_400_naming_the_param(http, body, param):
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_malformed_json_and_non_object_bodies(http):
    for content in (b"{bad", b"", b"[1, 2]", b"null"):
        r = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, content
        assert error_of(r)["type"] == "invalid_request_error"


def test_openai_exceptions_for_each_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="")
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=-1)
    assert e.value.body["param"] == "temperature"


def test_routing_errors_are_json(http):
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and error_of(r)["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", content=b"x" * (9 * 1024 * 1024))
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    assert r.headers["x-request-id"]


# -- concurrency, disconnects, overload --------------------------------------------------------


def test_eight_concurrent_streams(server):
    async def main():
        client = openai.AsyncOpenAI(api_key="x", base_url=server.base_url, max_retries=0)

        async def one(i: int) -> tuple[str, int]:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                max_tokens=12,
                temperature=0.5,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
            return text, usage.completion_tokens

        results = await asyncio.gather(*(one(i) for i in range(8)))
        await client.close()
        return results

    results = asyncio.run(main())
    assert all(n == 12 and text for text, n in results)


def test_client_disconnect_cancels_and_frees_the_slot(server, http, client):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with (
        httpx.Client(base_url=server.url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break
    slots = wait_slots_free(http)
    assert not any(s["is_processing"] for s in slots), slots
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content


def test_full_queue_gets_503_with_retry_after_and_recovers(server, http, client):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 200, "ignore_eos": True}

    async def burst() -> list[httpx.Response | Exception]:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as c:
            return await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body) for _ in range(80)), return_exceptions=True
            )

    results = asyncio.run(burst())  # clients time out (disconnect) after 5 s: their requests are cancelled
    rejected = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 503]
    assert rejected, [getattr(r, "status_code", r) for r in results]
    assert rejected[0].headers["retry-after"] and error_of(rejected[0])["code"] == "server_is_overloaded"
    slots = wait_slots_free(http, timeout=60)
    assert not any(s["is_processing"] for s in slots), slots
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content


# -- the seed's examples, as written -----------------------------------------------------------

SEED_CURLS = [
    "curl http://localhost:8080/health",
    """curl -X POST http://localhost:8080/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "llama-3-8b-mock",
    "messages": [
      {
        "role": "user",
        "content": "What is the capital of France?"
      }
    ],
    "stream": false,
    "max_tokens": 256,
    "temperature": 0.7
  }'""",
    """curl -X POST http://localhost:8080/v1/embeddings \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "llama-3-8b-mock",
    "input": "The quick brown fox"
  }'""",
    """curl -X POST http://localhost:8080/v1/embeddings \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "llama-3-8b-mock",
    "input": ["Hello", "world"]
  }'""",
]


def test_seed_curl_examples(server):
    assert shutil.which("curl"), "the seed's examples need curl"
    outputs = []
    for cmd in SEED_CURLS:
        cmd = cmd.replace("localhost:8080", f"127.0.0.1:{server.port}")  # the model name as written
        out = subprocess.run(
            ["bash", "-c", cmd + " -s"], capture_output=True, text=True, timeout=300, check=True
        )
        outputs.append(json.loads(out.stdout))
    health, chat, one, two = outputs
    assert health == {"status": "ok"}
    assert chat["model"] == one["model"] == two["model"] == MODEL  # "llama-3-8b-mock" served by it
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert (
        chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
    )
    assert len(one["data"]) == 1 and len(two["data"]) == 2
    assert one["usage"]["prompt_tokens"] == 4  # as in the seed's response


def test_seed_python_client_example(server):
    from openai import OpenAI

    client = OpenAI(api_key="not-needed", base_url=server.base_url)
    response = client.chat.completions.create(
        model="llama-3-8b-mock", messages=[{"role": "user", "content": "Hello"}]
    )
    assert response.choices[0].message.content and response.model == MODEL
    embeddings = client.embeddings.create(model="llama-3-8b-mock", input=["Hello", "world"])
    assert len(embeddings.data[0].embedding) == 576


def test_out_of_range_sampling_values_are_400_and_the_engine_lives_on(http):
    for extra in ({"top_k": 3_000_000_000}, {"top_k": 2**40}, {"seed": 2**80}):
        r = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": 2, **extra}
        )
        assert r.status_code == 400, (extra, r.text)
        assert error_of(r)["type"] == "invalid_request_error"
    assert http.get("/health").json() == {"status": "ok"}


def test_explicit_nulls_mean_defaults(http):
    body = {
        "model": MODEL,
        "messages": FRANCE,
        "max_tokens": 3,
        "n": None,
        "stream": None,
        "logprobs": None,
        "temperature": None,
        "stop": None,
        "stream_options": {"include_usage": None},
        "user": None,
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_retry_loop(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": ["hi"] * 100, "max_tokens": 1})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
