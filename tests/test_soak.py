"""bench/soak.py against a real server: 16 clients of random valid, invalid and dropped
requests plus a burst past the queue for 60 s in CI (`test_soak_60s`),
or as long as `LLAMA_JAX_SOAK_SECONDS` says (`pytest -m soak`); each on its own server. Afterwards:
no 5xx but the burst's 503s, nothing incomplete, no live slot, an empty queue, resident
memory grown by under 5% after warm-up, and the server still answers correctly."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "soak", Path(__file__).resolve().parent.parent / "bench" / "soak.py"
)
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak  # dataclasses look their module up
_spec.loader.exec_module(soak)


def _check(report) -> None:
    print("\n" + report.table())  # the table for the note (pytest -s)
    assert report.unexpected == [], report.unexpected[:10]
    assert report.server_errors == 0
    assert report.completed > 0 and report.disconnects > 0 and report.invalid_4xx > 0
    assert report.burst_rejected > 0  # the burst did overflow the queue ...
    assert report.burst_accepted > 0  # ... and what fit was served
    assert report.rss_growth < 0.05, report.table()


@pytest.fixture
def soak_server(tmp_path):
    """Its own server: a queue of 16, so that a burst of 40 overflows it and drains quickly."""
    from conftest import Server

    env = {
        "LLAMA_JAX_MAX_SEQ_LEN": "512",
        "LLAMA_JAX_MAX_SLOTS": "4",
        "LLAMA_JAX_MAX_QUEUE": "16",
        "LLAMA_JAX_WARMUP": "0",  # soak.warm_up compiles what the soak uses
    }
    srv = Server(env, tmp_path / "server.log")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_soak_60s(soak_server):
    _check(asyncio.run(soak.soak(soak_server.url, soak_server.proc.pid, duration=60.0, clients=16, burst=40)))


@pytest.mark.soak
@pytest.mark.slow
def test_soak_long(request):
    if "soak" not in (request.config.getoption("-m") or "") and "LLAMA_JAX_SOAK_SECONDS" not in os.environ:
        pytest.skip("the long soak runs when asked for: -m soak, or LLAMA_JAX_SOAK_SECONDS")  # not by -m slow
    soak_server = request.getfixturevalue("soak_server")
    seconds = float(os.environ.get("LLAMA_JAX_SOAK_SECONDS", "1800"))
    _check(
        asyncio.run(soak.soak(soak_server.url, soak_server.proc.pid, duration=seconds, clients=16, burst=40))
    )
