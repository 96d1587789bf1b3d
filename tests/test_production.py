"""The server as operators run it: two models from one config file, API keys, rate limits,
Prometheus metrics, CORS, graceful SIGTERM and TLS. Real hypercorn, the official client."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import time

import httpx
import openai
import pytest
from conftest import Server
from prometheus_client.parser import text_string_to_metric_families
from tiny import random_tensors, tiny_config, write_gguf

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
KEYS = ("sk-one-0123456789", "sk-two-0123456789", "sk-limited-000000", "sk-tokens-0000000")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
BIG = "SmolLM2-135M-Instruct.Q4_1"  # the default model's file again, lazy: beyond the budget


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("prod") / "tiny-chat.gguf"
    write_gguf(path, cfg, random_tensors(cfg))
    return path


@pytest.fixture(scope="module")
def prod(tiny_gguf):
    from llama_jax.weights import resolve_model_path

    lazy_gguf = tiny_gguf.parent / "lazy-tiny.gguf"
    lazy_gguf.write_bytes(tiny_gguf.read_bytes())
    config = tiny_gguf.parent / "llama-jax.toml"
    config.write_text(
        f"""
api_keys = ["{KEYS[0]}", "{KEYS[1]}", "{KEYS[2]}", "{KEYS[3]}"]
cors_origins = ["http://app.example"]
warmup = false
memory_budget_mb = 200

[[models]]
model = "{MODEL}"
max_seq_len = 512
max_slots = 2

[[models]]
model = "{tiny_gguf}"
aliases = ["my-model"]
max_seq_len = 256
max_slots = 2

[[models]]
model = "{lazy_gguf}"
lazy = true
idle_unload_s = 3
max_seq_len = 256
max_slots = 1

[[models]]
model = "{resolve_model_path(None)[1]}"
lazy = true
max_seq_len = 512
max_slots = 2

[rate_limits."{KEYS[2]}"]
rpm = 30

[rate_limits."{KEYS[3]}"]
tpm = 400
"""
    )
    srv = Server(
        {"LLAMA_JAX_CONFIG": str(config)}, tiny_gguf.parent / "prod.log", args=("--graceful-timeout", "20")
    )
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def client(server, key=KEYS[0], **kw) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=server.base_url, max_retries=kw.pop("max_retries", 0), **kw)


def auth(key=KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


# -- registry ----------------------------------------------------------------------------------


def test_both_models_are_listed_and_answer_concurrently(prod):
    ids = [m.id for m in client(prod).models.list().data]
    assert ids[:3] == [MODEL, "tiny-chat", "my-model"] and "lazy-tiny" in ids
    health = httpx.get(prod.url + "/health").json()
    assert health["status"] == "ok"
    assert health["models"] == {MODEL: "ok", "tiny-chat": "ok", "lazy-tiny": "unloaded", BIG: "unloaded"}

    async def main():
        c = openai.AsyncOpenAI(api_key=KEYS[1], base_url=prod.base_url, max_retries=0)
        kw = dict(messages=FRANCE, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        out = await asyncio.gather(
            c.chat.completions.create(model=MODEL, **kw),
            c.chat.completions.create(model="my-model", **kw),
            c.chat.completions.create(model="tiny-chat", **kw),
        )
        await c.close()
        return out

    big, tiny_alias, tiny = asyncio.run(main())
    assert [r.model for r in (big, tiny_alias, tiny)] == [MODEL, "my-model", "tiny-chat"]
    assert "Paris" in big.choices[0].message.content
    assert tiny_alias.choices[0].message.content == tiny.choices[0].message.content  # same model, greedy
    assert tiny.system_fingerprint != big.system_fingerprint
    with pytest.raises(openai.NotFoundError) as e:
        client(prod).chat.completions.create(model="nope", messages=FRANCE)
    assert e.value.code == "model_not_found"


def test_lazy_model_loads_on_first_use_and_unloads_when_idle(prod):
    def status():
        return httpx.get(prod.url + "/health").json()["models"]["lazy-tiny"]

    kw = dict(messages=FRANCE, max_tokens=3, extra_body={"ignore_eos": True})
    r = client(prod).chat.completions.create(model="lazy-tiny", **kw)  # waits for the load
    assert r.usage.completion_tokens == 3 and status() == "ok"
    deadline = time.monotonic() + 30
    while status() != "unloaded" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status() == "unloaded"  # idle for 3 s
    assert client(prod).chat.completions.create(model="lazy-tiny", **kw).usage.completion_tokens == 3


def test_a_load_beyond_the_memory_budget_is_refused_and_disturbs_nothing(prod):
    with pytest.raises(openai.InternalServerError) as e:
        client(prod).chat.completions.create(model=BIG, messages=FRANCE, max_tokens=2)
    assert e.value.status_code == 503 and e.value.code == "insufficient_memory"
    assert "200 MB memory budget" in e.value.message
    assert httpx.get(prod.url + "/health").json()["models"][BIG] == "unloaded"
    r = client(prod).chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=12, temperature=0)
    assert "Paris" in r.choices[0].message.content


def test_tokenize_picks_the_model_by_name(prod):
    big = httpx.post(prod.url + "/tokenize", json={"content": "Hello"}, headers=auth()).json()["tokens"]
    tiny = httpx.post(prod.url + "/tokenize", json={"content": "Hello", "model": "tiny-chat"}, headers=auth())
    assert big != tiny.json()["tokens"]
    props = httpx.get(prod.url + "/props", params={"model": "my-model"}, headers=auth()).json()
    assert props["model_alias"] == "tiny-chat" and props["total_slots"] >= 1
    r = httpx.get(prod.url + "/props", params={"model": "nope"}, headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # several models


# -- API keys ----------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401_and_each_valid_key_works(prod):
    with pytest.raises(openai.AuthenticationError) as e:
        client(prod, key="sk-wrong-key-000000").models.list()
    assert e.value.code == "invalid_api_key" and e.value.body["type"] == "authentication_error"
    r = httpx.post(prod.url + "/v1/chat/completions", json={"model": MODEL, "messages": FRANCE})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/metrics", "/slots", "/props"):  # /props names the model's file
        assert httpx.get(prod.url + path).status_code == 401
    assert httpx.post(prod.url + "/tokenize", json={"content": "x"}).status_code == 401
    assert httpx.get(prod.url + "/health").status_code == 200  # open for load balancers
    assert httpx.get(prod.url + "/version").status_code == 200
    for key in KEYS[:2]:
        r = client(prod, key=key).chat.completions.create(model="tiny-chat", messages=FRANCE, max_tokens=2)
        assert r.usage.completion_tokens >= 1
    assert "sk-wrong-key-000000" not in prod.log() and KEYS[0] not in prod.log()


# -- rate limits -------------------------------------------------------------------------------


def test_request_limit_429_headers_and_client_retry(prod):
    with httpx.Client(base_url=prod.url, headers=auth(KEYS[2])) as c:
        first = c.get("/v1/models")
        assert first.headers["x-ratelimit-limit-requests"] == "30"
        remaining = int(first.headers["x-ratelimit-remaining-requests"])
        assert first.headers["x-ratelimit-reset-requests"].endswith("s")
        statuses = [c.get("/v1/models").status_code for _ in range(remaining + 5)]
        assert 429 in statuses
        r = c.get("/v1/models")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(r.headers["x-ratelimit-remaining-requests"]) == 0
    # The official client waits as Retry-After says and retries: the call succeeds.
    retrying = client(prod, key=KEYS[2], max_retries=3)
    with httpx.Client(base_url=prod.url, headers=auth(KEYS[2])) as c:
        while c.get("/v1/models").status_code != 429:  # empty the bucket again (refills 1 per 2 s)
            pass
    raw = retrying.models.with_raw_response.list()
    assert raw.retries_taken >= 1 and raw.parse().data
    # Other keys are not affected.
    assert httpx.get(prod.url + "/v1/models", headers=auth(KEYS[1])).status_code == 200


def test_token_limit_reserves_then_settles_to_actual_use(prod):
    c = client(prod, key=KEYS[3])
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=FRANCE, max_tokens=300, temperature=0
    )
    r = raw.parse()
    assert r.choices[0].finish_reason == "stop"  # EOS well before 300 tokens
    # prompt + 300 tokens were reserved while it ran; the response reports what is left after
    # the unused ones were given back.
    left = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert 400 - r.usage.total_tokens - 1 <= left <= 400
    with pytest.raises(openai.RateLimitError) as e:  # more than a minute's budget: never retried
        c.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=420)
    assert e.value.code == "rate_limit_exceeded"
    c.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=300, temperature=0)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=340)
    assert int(e.value.response.headers["retry-after"]) >= 1


# -- metrics -----------------------------------------------------------------------------------


def scrape(server) -> dict:
    text = httpx.get(server.url + "/metrics", headers=auth()).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_move_by_the_right_amounts(prod):
    before = scrape(prod)
    model = (("model", "tiny-chat"),)
    n = 2
    for _ in range(n):
        client(prod).chat.completions.create(
            model="tiny-chat", messages=FRANCE, max_tokens=5, extra_body={"ignore_eos": True}
        )
    with pytest.raises(openai.BadRequestError):
        client(prod).chat.completions.create(model="tiny-chat", messages=FRANCE, max_tokens=1000)
    after = scrape(prod)

    def delta(name, labels=model):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert delta("llama_jax_generated_tokens_total") == 5 * n
    assert delta("llama_jax_engine_requests_total") == n
    assert delta("llama_jax_time_to_first_token_seconds_count") == n
    assert delta("llama_jax_inter_token_latency_seconds_count") == 4 * n
    ok = (("model", "tiny-chat"), ("route", "/v1/chat/completions"), ("status", "200"))
    bad = (("model", "tiny-chat"), ("route", "/v1/chat/completions"), ("status", "400"))
    assert delta("llama_jax_http_requests_total", ok) == n
    assert delta("llama_jax_http_requests_total", bad) == 1
    assert after[("llama_jax_max_slots", model)] == 2
    assert after[("llama_jax_live_slots", model)] == 0 and after[("llama_jax_queue_length", model)] == 0
    assert after[("llama_jax_model_ready", (("model", MODEL),))] == 1
    assert ("llama_jax_rate_limit_rejections_total", (("kind", "requests"),)) in after


# -- CORS --------------------------------------------------------------------------------------


def test_cors_only_for_configured_origins(prod):
    ok = httpx.get(prod.url + "/v1/models", headers={**auth(), "Origin": "http://app.example"})
    assert ok.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.get(prod.url + "/v1/models", headers={**auth(), "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    pre = httpx.options(
        prod.url + "/v1/chat/completions",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 200 and "Authorization" in pre.headers["access-control-allow-headers"]


# -- shutdown (last: it stops the server) ------------------------------------------------------


def test_sigterm_lets_a_running_stream_finish_and_exits_0(prod):
    body = {"model": "tiny-chat", "messages": FRANCE, "max_tokens": 40, "stream": True, "ignore_eos": True}
    lines = []
    with httpx.stream("POST", prod.url + "/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and not lines:
                prod.proc.send_signal(signal.SIGTERM)
            if line.startswith("data: "):
                lines.append(line)
    assert lines[-1] == "data: [DONE]"
    assert prod.proc.wait(60) == 0


# -- TLS ---------------------------------------------------------------------------------------


def test_https_with_a_self_signed_certificate(tiny_gguf):
    d = tiny_gguf.parent
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    srv = Server(
        {
            "LLAMA_JAX_MODEL": str(tiny_gguf),
            "LLAMA_JAX_MAX_SEQ_LEN": "256",
            "LLAMA_JAX_MAX_SLOTS": "1",
            "LLAMA_JAX_WARMUP": "0",
        },
        d / "tls.log",
        args=("--certfile", str(cert), "--keyfile", str(key)),
        scheme="https",
    )
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        srv.wait_healthy(verify=ctx)
        c = openai.OpenAI(api_key="x", base_url=srv.base_url, http_client=httpx.Client(verify=ctx))
        r = c.chat.completions.create(
            model="tiny-chat", messages=FRANCE, max_tokens=3, extra_body={"ignore_eos": True}
        )
        assert r.usage.completion_tokens == 3
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health")  # not trusted without the certificate
    finally:
        srv.stop()
