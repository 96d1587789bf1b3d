"""What the HTTP surface gives away, and what one request can do to the others: no static
folder outside auth, log lines a request path cannot forge, tokenizer routes that neither stall
the event loop nor escape the rate limit, and `/slots` without other tenants' request ids. A
real `hypercorn serve.app:app` started in a folder that has a `static/` of its own."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from test_settings_precedence import free_port, spawn
from tiny import random_tensors, tiny_config, write_gguf

KEY, OTHER, LIMITED = "sk-surface-one-00", "sk-surface-two-00", "sk-surface-limit0"


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("surface")
    cfg = tiny_config()
    write_gguf(tmp / "tiny-chat.gguf", cfg, random_tensors(cfg))
    (tmp / "static").mkdir()
    (tmp / "static" / "leak.txt").write_text("a file of the working directory")
    (tmp / "llama-jax.toml").write_text(
        f'model = "{tmp / "tiny-chat.gguf"}"\napi_keys = ["{KEY}", "{OTHER}", "{LIMITED}"]\n'
        f'max_seq_len = 512\nmax_slots = 2\nwarmup = false\n\n[rate_limits."{LIMITED}"]\nrpm = 2\n'
    )
    port = free_port()
    argv = ["-m", "hypercorn", "serve.app:app", "--bind", f"127.0.0.1:{port}"]
    server = spawn(argv, {"LLAMA_JAX_CONFIG": str(tmp / "llama-jax.toml")}, tmp, port, tmp / "server.log")
    try:
        server.wait_healthy(timeout=300)
        yield server
    finally:
        server.stop()


def test_the_working_directory_static_folder_is_not_served(srv):
    for headers in ({}, auth()):
        r = httpx.get(srv.url + "/static/leak.txt", headers=headers)
        assert r.status_code in (401, 404) and "working directory" not in r.text
    assert httpx.get(srv.url + "/static/webui/app.js").status_code == 200  # the page's own files


def test_control_characters_in_a_path_cannot_forge_a_log_line(srv):
    forged = "req-forged GET /v1/admin 200 0.001s"
    r = httpx.get(srv.url + "/v1/models%0D%0A" + forged.replace(" ", "%20"), headers=auth())
    assert r.status_code == 404
    deadline = time.monotonic() + 10
    while "req-forged" not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [ln for ln in srv.log().splitlines() if "req-forged" in ln]
    assert len(lines) == 1 and "/v1/models\\r\\nreq-forged" in lines[0]
    assert not lines[0].startswith("req-forged")


def test_tokenizer_routes_count_against_the_request_rate_limit(srv):
    codes = [
        httpx.post(srv.url + "/tokenize", json={"content": "hi"}, headers=auth(LIMITED)).status_code
        for _ in range(3)
    ]
    assert codes[:2] == [200, 200] and codes[2] == 429
    r = httpx.post(srv.url + "/detokenize", json={"tokens": [1]}, headers=auth(LIMITED))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert httpx.post(srv.url + "/tokenize", json={"content": "hi"}, headers=auth()).status_code == 200


def test_a_large_tokenize_does_not_stall_health(srv):
    text = "hello world, " * (3 * 1024 * 1024 // 13)  # 3 MiB: seconds of tokenizing here
    result = {}

    def tokenize():
        t = time.monotonic()
        r = httpx.post(srv.url + "/tokenize", json={"content": text}, headers=auth(), timeout=120)
        result["seconds"], result["tokens"] = time.monotonic() - t, len(r.json()["tokens"])

    worker = threading.Thread(target=tokenize)
    worker.start()
    time.sleep(0.2)  # the body is sent and being worked on
    worst = 0.0
    while worker.is_alive():
        t = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=120).status_code == 200
        worst = max(worst, time.monotonic() - t)
        time.sleep(0.02)
    worker.join()
    assert result["tokens"] > 1_000_000
    assert result["seconds"] > 1.0 and worst < result["seconds"] / 3, (worst, result)


def test_slots_show_no_other_callers_request_ids(srv):
    stop = threading.Event()

    def generate():
        body = {"model": "tiny-chat", "prompt": "a", "max_tokens": 400, "ignore_eos": True}
        while not stop.is_set():
            httpx.post(srv.url + "/v1/completions", json=body, headers=auth(), timeout=60)

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        seen = []
        deadline = time.monotonic() + 30
        while not any(s["is_processing"] for s in seen) and time.monotonic() < deadline:
            seen = httpx.get(srv.url + "/slots", headers=auth(OTHER)).json()
    finally:
        stop.set()
        worker.join()
    busy = [s for s in seen if s["is_processing"]]
    assert busy and all(s["id_task"] is None for s in busy), seen
    assert all(s["n_decoded"] >= 0 and s["n_ctx"] == 512 for s in seen)
    assert not re.search(r"req-\d+", str(seen))
