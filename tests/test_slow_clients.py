"""Slow and abusive clients against the session server (bare `hypercorn serve.app:app`, so
hypercorn's own 5 s keep-alive timeout): idle and half-open connections are closed, a slow
request body and a stream nobody reads cost their own client only, and every other client is
served meanwhile (docs/http-api.md, "Connections and timeouts")."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm"
HI = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
KEEP_ALIVE_S = 5  # hypercorn's default keep_alive_timeout


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _served_quickly(server, seconds: float = 30.0) -> float:
    t0 = time.monotonic()
    r = httpx.post(server.base_url + "/chat/completions", json=HI, timeout=seconds)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


def test_idle_and_half_open_connections_are_closed_and_starve_no_one(server):
    idle = [_connect(server) for _ in range(200)]
    half_open = [_connect(server) for _ in range(20)]
    for s in half_open:  # slowloris: a request line and never the end of the headers
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    t0 = time.monotonic()
    assert _served_quickly(server) < 30
    for s in half_open[:5]:
        s.sendall(b"a")  # a trickle of header bytes does not extend the connection's life
    for s in idle + half_open:
        assert _closed_by_server(s, KEEP_ALIVE_S + 10 - (time.monotonic() - t0))
        s.close()
    assert _served_quickly(server) < 30


def test_slow_request_body_costs_only_its_own_client(server):
    body = httpx.Request("POST", server.base_url + "/chat/completions", json=HI).content
    result: dict[str, bytes] = {}

    def dribble() -> None:
        with _connect(server) as s:
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            s.sendall(head.encode())
            for i in range(0, len(body), 4):
                s.sendall(body[i : i + 4])
                time.sleep(0.1)
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
            result["response"] = b"".join(chunks)

    slow = threading.Thread(target=dribble)
    slow.start()
    time.sleep(0.5)
    assert slow.is_alive()  # still sending its body ...
    assert _served_quickly(server) < 30  # ... while others are served
    slow.join(120)
    assert result["response"].startswith(b"HTTP/1.1 200"), result["response"][:300]


def test_a_stream_nobody_reads_frees_its_slot_and_starves_no_one(server):
    body = {**HI, "max_tokens": 16, "ignore_eos": True, "stream": True}
    payload = httpx.Request("POST", server.base_url + "/chat/completions", json=body).content
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a tiny window, never read
        s.connect(("127.0.0.1", server.port))
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        assert _served_quickly(server) < 30
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the generation ends whether or not anyone reads it
            slots = httpx.get(server.url + "/slots", timeout=10).json()
            if not any(x["is_processing"] for x in slots):
                break
            time.sleep(0.25)
        assert not any(x["is_processing"] for x in slots), slots
        assert _served_quickly(server) < 30


def test_llama_jax_serve_bounds_idle_connections_but_never_cuts_a_stream():
    from serve.server import hypercorn_config
    from serve.settings import Settings

    config = hypercorn_config(Settings())
    assert 0 < config.keep_alive_timeout <= 120  # idle and half-open connections are closed
    assert config.read_timeout is None  # a client reading a long stream sends nothing for minutes
    assert config.h11_max_incomplete_size <= 64 * 1024  # request line and headers
