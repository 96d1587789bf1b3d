"""No request can stall the others (a real server of the default model): an embeddings flood
and dropped `n`=2 streams leave a normal stream's pace and `/health` alone (bench/soak.py's
`--hostile` check), one client holds at most its share of the queue, clients that leave free
their slots and their embeddings work at once, and SIGTERM ends within its timeout while the
engine is busy."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import Server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
GRACEFUL_S = 3

_spec = importlib.util.spec_from_file_location(
    "soak", Path(__file__).resolve().parent.parent / "bench" / "soak.py"
)
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak
_spec.loader.exec_module(soak)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    env = {
        "LLAMA_JAX_MAX_SEQ_LEN": "512",
        "LLAMA_JAX_MAX_SLOTS": "4",
        "LLAMA_JAX_MAX_QUEUE": "64",  # a share of 16 per client
        "LLAMA_JAX_WARMUP": "1",  # every decode batch compiled: no compile in the middle of a stream
        # Float weights: a 4-bit step of this model takes ~5 ms, so the 3x bound on the normal
        # stream's latency would measure the host's per-step noise more than the scheduling
        # (1.7-3.0x seen in 4-bit; bench/soak.py --hostile measures the served default).
        "LLAMA_JAX_QUANTIZE": "none",
    }
    s = Server(
        env, tmp_path_factory.mktemp("fair") / "server.log", args=("--graceful-timeout", str(GRACEFUL_S))
    )
    try:
        s.wait_healthy()
        yield s
    finally:
        s.stop()


def _flood(docs: int) -> dict:
    inputs = [f"Document {i} talks about the sea, the sky and the land. " * 30 for i in range(docs)]
    return {"model": MODEL, "input": inputs}


def _slots_free(srv, within: float) -> list:
    deadline = time.monotonic() + within
    while True:
        slots = httpx.get(srv.url + "/slots", timeout=5).json()
        if not any(s["is_processing"] for s in slots) or time.monotonic() > deadline:
            return [s for s in slots if s["is_processing"]]
        time.sleep(0.1)


def test_hostile_requests_leave_a_normal_stream_and_health_responsive(srv):
    report = asyncio.run(soak.hostile(srv.url, docs=128))
    print("\n" + report.table())  # for the note (pytest -s)
    assert report.flood_running_at_end and report.dropped_groups >= 1  # the load overlapped the stream
    assert report.failures == [], report.table()


def test_one_client_holds_at_most_its_share_of_the_queue(srv):
    body = {"model": MODEL, "prompt": ["a", "b", "c", "d"], "n": 4, "max_tokens": 100, "stream": True}
    too_many = httpx.post(srv.base_url + "/completions", json={**body, "prompt": list("abcde")})
    assert too_many.status_code == 400 and "for one client (16)" in too_many.json()["error"]["message"]
    other = httpx.Client(base_url=srv.base_url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with (
        httpx.Client(base_url=srv.base_url, timeout=60) as mine,
        mine.stream("POST", "/completions", json=body) as first,
    ):
        assert first.status_code == 200  # 4 in slots, 12 waiting: the client's share is used up
        again = mine.post("/completions", json={**body, "stream": False})
        assert again.status_code == 503 and again.headers["retry-after"]
        assert "per client" in again.json()["error"]["message"]
        with other.stream("POST", "/completions", json=body) as theirs:  # another address gets in
            assert theirs.status_code == 200
    other.close()
    assert _slots_free(srv, 10) == []


def test_clients_that_leave_free_their_slots_and_embeddings_at_once(srv):
    def flood() -> None:
        try:
            httpx.post(srv.base_url + "/embeddings", json=_flood(200), timeout=3)
        except httpx.TimeoutException:
            pass  # the client leaves

    flooder = threading.Thread(target=flood)
    flooder.start()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400, "n": 4}
    try:
        httpx.post(srv.base_url + "/chat/completions", json={**body, "ignore_eos": True}, timeout=3)
    except httpx.TimeoutException:
        pass  # this client leaves too: 4 samples in flight
    flooder.join()
    assert _slots_free(srv, 3) == []  # the group is gone within a few steps ...
    t0 = time.monotonic()
    r = httpx.post(
        srv.base_url + "/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        timeout=60,
    )
    assert r.status_code == 200 and time.monotonic() - t0 < 5  # ... and so is the flood's work


def test_sigterm_ends_within_its_timeout_while_the_engine_is_busy(srv):
    threading.Thread(
        target=lambda: httpx.post(srv.base_url + "/embeddings", json=_flood(200), timeout=60), daemon=True
    ).start()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400}
    threading.Thread(
        target=lambda: httpx.post(srv.base_url + "/chat/completions", json={**body, "n": 2}, timeout=60),
        daemon=True,
    ).start()
    time.sleep(2)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(60)
    assert time.monotonic() - t0 < GRACEFUL_S + 7, srv.log()[-2000:]  # engine stop + process exit
