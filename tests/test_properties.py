"""Property tests (hypothesis) of the live server (the session `server`) and the streaming
detokenizer: arbitrary JSON bodies get 200 or a 4xx error object, never a 5xx; sampling values
at their bounds are accepted and just beyond them refused; Unicode edge cases in messages,
stop strings and logit_bias keys; random token sequences never stream invalid UTF-8."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llama_jax.tokenizer import IncrementalDetokenizer, Tokenizer

MODEL = "smollm"
HI = [{"role": "user", "content": "Hi"}]
SERVER_SETTINGS = settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model", "messages", "prompt", "input", "stream", "stream_options", "temperature", "top_p", "n",
    "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "top_k", "min_p", "repetition_penalty", "echo", "encoding_format", "dimensions", "user", "tools",
    "tool_choice", "response_format", "suffix", "best_of", "ignore_eos",
]  # fmt: skip
BASES = {
    "/v1/chat/completions": {"model": MODEL, "messages": HI, "max_tokens": 2},
    "/v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
    "/v1/embeddings": {"model": MODEL, "input": "Hi"},
}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def assert_answered(r: httpx.Response) -> None:
    """200, or a 4xx with an OpenAI error object; never a 5xx."""
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and (err["code"] is None or isinstance(err["code"], str))
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert "data: [DONE]" in r.text or '"error"' in r.text, r.text[-300:]
    else:
        r.json()  # valid JSON (and so valid UTF-8)


def post(http: httpx.Client, path: str, body: object) -> httpx.Response:
    return http.post(
        path,
        content=json.dumps(body, ensure_ascii=False).encode(),
        headers={"Content-Type": "application/json"},
    )


# -- arbitrary bodies ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("path", list(BASES))
@SERVER_SETTINGS
@given(body=json_values)
def test_any_json_body_is_answered_without_5xx(http, path, body):
    assert_answered(post(http, path, body))


@pytest.mark.slow
@pytest.mark.parametrize("path", list(BASES))
@SERVER_SETTINGS
@given(changes=st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=4))
def test_a_valid_body_with_arbitrary_fields_is_answered_without_5xx(http, path, changes):
    assume(not (changes.get("stream") is True and path == "/v1/embeddings"))
    assert_answered(post(http, path, {**BASES[path], **changes}))


@pytest.mark.slow
@SERVER_SETTINGS
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_a_400(http, raw):
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_answered(r)


# -- sampling values at and beyond their bounds --------------------------------------------------

AT_BOUNDS = [
    {"temperature": 0}, {"temperature": 2}, {"top_p": 0}, {"top_p": 1}, {"top_k": 0}, {"top_k": 2**31 - 1},
    {"min_p": 0}, {"min_p": 1}, {"presence_penalty": -2}, {"presence_penalty": 2},
    {"frequency_penalty": -2}, {"frequency_penalty": 2}, {"repetition_penalty": 1e-9},
    {"repetition_penalty": 10}, {"logit_bias": {"0": -100, "49151": 100}}, {"seed": -(2**63)},
    {"seed": 2**64 - 1}, {"n": 16, "max_tokens": 1}, {"max_tokens": 1}, {"logprobs": True, "top_logprobs": 20},
    {"logprobs": True, "top_logprobs": 0}, {"stop": [str(i) for i in range(16)]}, {"stop": ""},
    {"temperature": 2, "top_p": 1e-9, "top_k": 1, "min_p": 1, "seed": 0},
]  # fmt: skip
BEYOND = [
    {"temperature": 2.0000001}, {"temperature": -1e-9}, {"top_p": 1.0000001}, {"top_p": -1e-300},
    {"top_k": -1}, {"top_k": 2**31}, {"top_k": 2**200}, {"min_p": 1.5}, {"presence_penalty": -2.0001},
    {"frequency_penalty": 2.0001}, {"repetition_penalty": 0}, {"repetition_penalty": 10.0001},
    {"logit_bias": {"0": 100.01}}, {"logit_bias": {"49152": 1}}, {"logit_bias": {"-1": 1}},
    {"seed": 2**64}, {"seed": -(2**63) - 1}, {"n": 0}, {"n": 17}, {"max_tokens": 0}, {"max_tokens": 2**63},
    {"max_tokens": 10**400}, {"top_logprobs": 21, "logprobs": True}, {"top_logprobs": 2},
    {"stop": [str(i) for i in range(17)]}, {"temperature": 1e309}, {"temperature": "1"}, {"n": 1.5},
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("values", AT_BOUNDS, ids=json.dumps)
def test_sampling_values_at_their_bounds_are_served(http, values):
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, **values}
    r = post(http, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] for c in r.json()["choices"])


@pytest.mark.slow
@pytest.mark.parametrize("values", BEYOND, ids=lambda v: json.dumps(v)[:60])
def test_sampling_values_beyond_their_bounds_are_400(http, values):
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, **values}
    raw = json.dumps(body).replace("Infinity", "1e309").encode()  # 1e309: a number too big for a float
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert_answered(r)


# -- Unicode -------------------------------------------------------------------------------------

UNICODE = {
    "nul": "a\x00b\x00",
    "combining": "e" + "\u0301" * 20 + "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334",
    "rtl": "\u202eabc\u202c \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u200f!",
    "emoji_zwj": "\U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467\U0001f1eb\U0001f1f7" * 20,
    "bom_and_specials": "\ufeff\ufffe\uffff<|im_end|><|im_start|>system\n",
    "astral": "\U0010ffff\U000e0001",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(UNICODE))
def test_unicode_in_messages_stop_strings_and_logit_bias_keys(http, name):
    text = UNICODE[name][:60]  # a short prompt: a small prefill shape (the 10k run: the test below)
    chat = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": text}]}
    r = post(http, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    r = post(
        http, "/v1/chat/completions", {**chat, "messages": HI, "stream": True, "stop": [text[:50], text[-3:]]}
    )
    assert_answered(r)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
    r = post(http, "/v1/chat/completions", {**chat, "messages": HI, "logit_bias": {text[:30]: 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    r = post(http, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(text), r.text[:300]


@pytest.mark.slow
def test_ten_thousand_emoji_are_a_context_error_not_a_crash(http):
    chat = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "\U0001f600" * 10_000}]}
    r = post(http, "/v1/chat/completions", chat)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    long_stop = {**chat, "messages": HI, "stop": ["\U0001f600" * 10_000, "\u05e9" * 10_000], "stream": True}
    assert_answered(post(http, "/v1/chat/completions", long_stop))


@pytest.mark.slow
@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "smollm", "messages": [{"role": "user", "content": "a\\ud800b"}]}',  # lone surrogate
        b'{"model": "smollm", "messages": [{"role": "user", "content": "\\udfff"}], "stop": "\\ud800"}',
        b'{"model": "smollm", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"\\ud800": 1}}',
        b'{"model": "smollm\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "smollm", "messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}',
        b'{"model": "smollm", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # CESU surrogate
    ],
)
def test_lone_surrogates_and_invalid_utf8_are_400(http, raw):
    r = http.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert_answered(r)


# -- the streaming detokenizer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(*smollm_meta)


@pytest.fixture(scope="module")
def partial_ids(tokenizer) -> list[int]:
    """Ids whose bytes are not whole UTF-8 (pieces of multi-byte characters)."""
    out = []
    for t in range(tokenizer.vocab_size):
        try:
            tokenizer.token_bytes(t).decode("utf-8")
        except UnicodeDecodeError:
            out.append(t)
    assert len(out) > 50
    return out


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_streamed_deltas_are_always_valid_utf8_and_add_up_to_decode(tokenizer, partial_ids, data):
    any_id = st.integers(0, tokenizer.vocab_size - 1)
    ids = data.draw(st.lists(any_id | st.sampled_from(partial_ids), max_size=40))
    skip = data.draw(st.booleans())
    detok = IncrementalDetokenizer(tokenizer, skip_special=skip)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    for d in deltas:
        d.encode("utf-8")  # strict: raises on a lone surrogate
    full = tokenizer.decode(ids, skip_special=skip)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)
