"""An engine-thread fault in a real server (serve/state.py's watchdog): the requests in flight
fail with OpenAI error objects, `/health` turns unhealthy, and the process exits with status
EXIT_ENGINE_FAILED for its supervisor to restart (both under bare hypercorn and under
`llama-jax serve`'s own hypercorn)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.state import EXIT_ENGINE_FAILED

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    "LLAMA_JAX_MAX_SEQ_LEN": "512",
    "LLAMA_JAX_MAX_SLOTS": "4",
    "LLAMA_JAX_WARMUP": "0",
}
# The fault tests need their three requests in flight together: every shape compiled first
# (compiled on demand, a request waits for its compile while the others stream, and the first
# one admitted can finish before the others start).
FULL_WARMUP = {**ENV, "LLAMA_JAX_WARMUP": "full"}
CHAT = {
    "model": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 300,
    "ignore_eos": True,
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The server in a process group of its own, so `_stop` also ends hypercorn's worker (a
    killed parent left its worker serving, with a stalled engine, after the test)."""
    return subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(log.read_text()[-3000:])


def _inject_and_check(url: str, proc: subprocess.Popen, trigger: Path, log: Path) -> None:
    """Two streams and one plain request in flight, then the fault: each gets an error."""
    started = threading.Barrier(3)
    results: dict[str, object] = {}

    def stream(name: str) -> None:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60
        ) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 3:
                        started.wait(30)
            results[name] = (r.status_code, events)

    def plain() -> None:
        results["plain"] = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)

    threads = [threading.Thread(target=stream, args=(f"s{i}",)) for i in range(2)]
    threads.append(threading.Thread(target=plain))
    for t in threads:
        t.start()
    started.wait(60)  # both streams are producing tokens (the plain request is in a slot too)
    trigger.touch()
    for t in threads:
        t.join(60)
    health = httpx.get(url + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] in ("error", "shutting_down")
    for name in ("s0", "s1"):
        status, events = results[name]
        assert status == 200 and events[-1] != "[DONE]", events[-3:]
        error = json.loads(events[-1])["error"]
        assert error["type"] == "server_error" and "restart" in error["message"], error
    plain = results["plain"]
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error", plain.text
    assert proc.wait(30) == EXIT_ENGINE_FAILED, log.read_text()[-3000:]
    text = log.read_text()
    assert "injected engine fault" in text and "exiting for a restart" in text


def test_engine_fault_under_bare_hypercorn_fails_requests_then_exits_for_a_restart(tmp_path):
    port, trigger, log = _free_port(), tmp_path / "fault", tmp_path / "server.log"
    env = {**FULL_WARMUP, "LLAMA_JAX_TEST_FAULT_FILE": str(trigger), "PYTHONPATH": str(ROOT / "tests")}
    proc = _start(
        # `--workers 0`: serve in this process. With worker processes, hypercorn 0.18's parent
        # exits 0 whatever its worker's status (docs/troubleshooting.md).
        [sys.executable, "-m", "hypercorn", "fault_app:app", "--workers", "0", "--bind", f"127.0.0.1:{port}"],
        env,
        log,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        _inject_and_check(url, proc, trigger, log)
    finally:
        _stop(proc)


def test_engine_fault_under_llama_jax_serve_stops_gracefully_and_exits_for_a_restart(tmp_path):
    port, trigger, log = _free_port(), tmp_path / "fault", tmp_path / "server.log"
    env = {"LLAMA_JAX_TEST_FAULT_FILE": str(trigger), "PYTHONPATH": str(ROOT / "tests")}
    code = "import sys, fault_app; from llama_jax.cli import main; sys.exit(main())"
    args = ["serve", "--port", str(port), "--max-seq-len", "512", "--max-slots", "4", "--warmup", "full"]
    proc = _start([sys.executable, "-c", code, *args], env, log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        _inject_and_check(url, proc, trigger, log)
    finally:
        _stop(proc)


def _tiny_model(tmp_path: Path) -> Path:
    from tiny import random_tensors, tiny_config, write_gguf

    cfg = tiny_config()
    path = tmp_path / "tiny-chat.gguf"
    write_gguf(path, cfg, random_tensors(cfg))
    return path


def test_health_says_stalled_while_an_engine_with_work_finishes_no_step(tmp_path):
    port, stall, log = _free_port(), tmp_path / "stall", tmp_path / "server.log"
    env = {
        "LLAMA_JAX_MODEL": str(_tiny_model(tmp_path)),
        "LLAMA_JAX_MAX_SEQ_LEN": "128",
        "LLAMA_JAX_WARMUP": "0",
        "LLAMA_JAX_STALL_TIMEOUT_S": "2",
        "LLAMA_JAX_TEST_FAULT_FILE": str(tmp_path / "no-fault"),
        "LLAMA_JAX_TEST_STALL_FILE": str(stall),
        "PYTHONPATH": str(ROOT / "tests"),
    }
    cmd = [sys.executable, "-m", "hypercorn", "fault_app:app", "--bind", f"127.0.0.1:{port}"]
    proc = _start(cmd, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        stall.touch()
        result: dict = {}
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        chat = threading.Thread(
            target=lambda: result.update(r=httpx.post(url + "/v1/chat/completions", json=body, timeout=60))
        )
        chat.start()
        time.sleep(1)
        assert httpx.get(url + "/health", timeout=1).status_code == 200  # not yet the stall timeout
        deadline = time.monotonic() + 10
        while (health := httpx.get(url + "/health", timeout=1)).status_code == 200:
            assert time.monotonic() < deadline, health.json()
            time.sleep(0.2)
        assert health.status_code == 503 and health.json()["status"] == "stalled", health.text
        assert health.json()["stalled_seconds"]["tiny-chat"] >= 2
        stall.unlink()  # the engine moves again: the request finishes and health recovers
        chat.join(60)
        assert result["r"].status_code == 200
        assert httpx.get(url + "/health", timeout=1).json() == {"status": "ok"}
    finally:
        _stop(proc)


def test_health_names_no_file_paths_when_a_model_fails_to_load(tmp_path):
    bad = tmp_path / "private-models" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF not really")
    port, log = _free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "hypercorn", "serve.app:app", "--bind", f"127.0.0.1:{port}"]
    proc = _start(cmd, {"LLAMA_JAX_MODEL": str(bad)}, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                if health.json()["status"] == "error":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        assert health.status_code == 503
        assert "private-models" not in health.text and "GGUF" not in health.text, health.text
        assert "server log" in health.json()["errors"]["broken"]
        assert "private-models" in log.read_text()  # the details are for the operator
    finally:
        _stop(proc)
