"""Server configuration and start-up: `LLAMA_JAX_*` settings, `llama-jax serve` failing fast,
and a tiny-model server that reports `loading` until its warm-up is done."""

from __future__ import annotations

import os

import httpx
import openai
import pytest
from conftest import Server
from tiny import random_tensors, tiny_config, write_gguf

from llama_jax.cli import main
from serve.settings import Settings


def test_settings_from_environment():
    s = Settings.from_env(
        {
            "LLAMA_JAX_MODEL": "/models/x.gguf",
            "LLAMA_JAX_ALIAS": "a, b,",
            "LLAMA_JAX_PORT": "9000",
            "LLAMA_JAX_MAX_SLOTS": "16",
            "LLAMA_JAX_WARMUP": "off",
            "LLAMA_JAX_QUANTIZE": "int8",
            "UNRELATED": "1",
        }
    )
    assert (s.model, s.aliases, s.port, s.max_slots, s.warmup, s.quantize) == (
        "/models/x.gguf",
        ("a", "b"),
        9000,
        16,
        "none",
        "int8",
    )
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(("key", "value"), [("LLAMA_JAX_PORT", "eighty"), ("LLAMA_JAX_WARMUP", "maybe")])
def test_bad_environment_values_name_the_variable(key, value):
    with pytest.raises(ValueError, match=key):
        Settings.from_env({key: value})


def test_serve_with_a_missing_model_fails_fast(tmp_path, capsys):
    missing = tmp_path / "nope.gguf"
    assert main(["serve", "--model", str(missing), "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("tiny") / "tiny-chat.gguf"
    write_gguf(path, cfg, random_tensors(cfg))
    srv = Server(
        {
            "LLAMA_JAX_MODEL": str(path),
            "LLAMA_JAX_MAX_SEQ_LEN": "64",
            "LLAMA_JAX_MAX_SLOTS": "2",
            "LLAMA_JAX_WARMUP": "1",
        },
        path.parent / "server.log",
    )
    try:
        srv.statuses = srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


def test_warmup_modes_from_flags_variables_and_older_yes_no_values():
    from serve.cli import serve_settings

    assert Settings().warmup == "first"
    assert Settings.from_env({"LLAMA_JAX_WARMUP": "full"}).warmup == "full"
    assert Settings.from_env({"LLAMA_JAX_WARMUP": "yes"}).warmup == "full"
    assert Settings(warmup=False).warmup == "none"  # a config file's `warmup = false`
    parser = serve_parser()
    for argv, mode in ((["--warmup"], "full"), (["--warmup", "first"], "first"), (["--no-warmup"], "none")):
        assert serve_settings(parser.parse_args(argv)).warmup == mode


def serve_parser():
    import argparse

    from serve.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_health_is_loading_until_warm_then_serves(tiny_server):
    """`--warmup full` (here LLAMA_JAX_WARMUP=1): every shape compiled before /health says ok."""
    assert 503 in tiny_server.statuses and tiny_server.statuses[-1] == 200
    log = tiny_server.log()
    assert log.index("warm-up compiled every step shape") < log.index("serving tiny-chat")
    assert httpx.get(tiny_server.url + "/health").json() == {"status": "ok"}  # nothing left to compile
    client = openai.OpenAI(api_key="x", base_url=tiny_server.base_url, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    r = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5
    assert "GET /health 503" in log  # each request is logged on one line, with its status
    assert "POST /v1/chat/completions 200 tokens=" in tiny_server.log()


def test_serves_a_first_request_while_the_other_shapes_compile(tmp_path):
    """The default warm-up ("first"): /health is ok once a first request's steps are compiled,
    says how many shapes are left, and a request is answered while they compile."""
    cfg = tiny_config()
    path = tmp_path / "tiny-chat.gguf"
    write_gguf(path, cfg, random_tensors(cfg))
    srv = Server(
        {
            "LLAMA_JAX_MODEL": str(path),
            "LLAMA_JAX_MAX_SEQ_LEN": "512",
            "LLAMA_JAX_MAX_SLOTS": "4",
            "LLAMA_JAX_WARMUP": "",  # the default
            # An empty cache: the background compiles are real ones (a few seconds in all).
            "LLAMA_JAX_COMPILATION_CACHE": str(tmp_path / "xla"),
        },
        tmp_path / "server.log",
    )
    try:
        srv.wait_healthy(timeout=300)
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "ok" and health["compile"]["pending"] > 0, health
        r = httpx.post(
            srv.base_url + "/completions",
            json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 4, "ignore_eos": True},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        slots = httpx.get(srv.url + "/slots")
        assert int(slots.headers["X-Pending-Compiles"]) > 0 and len(slots.json()) == 4
        log = srv.log()
        assert "warm-up compiled a first request's steps" in log
        assert "every planned step shape is compiled" not in log  # the request did not wait for it
    finally:
        srv.stop()


def test_a_stream_that_fails_midway_ends_with_an_error_event():
    import asyncio
    import json

    from quart import Quart

    from serve.errors import APIError
    from serve.sse import event, sse_response

    outcomes = []
    app = Quart(__name__)

    @app.get("/s")
    async def stream():
        async def events():
            yield event({"n": 1})
            raise APIError(400, "context exceeded mid-way", code="context_length_exceeded")

        return sse_response(events(), "req-1", lambda outcome, _s: outcomes.append(outcome))

    async def main():
        r = await app.test_client().get("/s")
        return r.status_code, (await r.get_data()).decode()

    status, text = asyncio.run(main())
    blocks = [b for b in text.split("\n\n") if b]
    assert status == 200 and blocks[0] == 'data: {"n":1}'
    assert json.loads(blocks[1].removeprefix("data: "))["error"]["code"] == "context_length_exceeded"
    assert "[DONE]" not in text and outcomes == ["error"]


def test_one_model_answers_any_name_unless_strict_and_several_never_do():
    from serve.errors import APIError
    from serve.settings import ModelSpec
    from serve.state import ServerState

    one = ServerState(Settings(aliases=("mine",)))
    assert one.get("gpt-4o").id == one.get("mine").id == "smollm2-135m-instruct"
    strict = ServerState(Settings.from_env({"LLAMA_JAX_STRICT_MODEL_NAMES": "1"}))
    several = ServerState(Settings(models=(ModelSpec(), ModelSpec(model="other.gguf"))))
    for state, kwargs in ((strict, {}), (one, {"exact": True}), (several, {})):
        with pytest.raises(APIError) as e:
            state.get("gpt-4o", **kwargs)
        assert e.value.status == 404 and e.value.code == "model_not_found"
    assert several.get("other").id == "other" and strict.get("smollm2-135m-instruct")


def test_threads_flag_sizes_the_xla_cpu_pools():
    """`use_threads(N)` (`-t N`) sets the thread counts XLA:CPU and the CPU kernels read when
    they start: a process given more has more threads (XLA's two pools grow with N)."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from llama_jax import cli\n"
        "cli.use_threads(int(sys.argv[1]))\n"
        "import jax.numpy as jnp\n"
        "x = jnp.ones((256, 256)); (x @ x).block_until_ready()\n"
        "print(len(os.listdir('/proc/self/task')), os.environ['PJRT_NPROC'], os.environ['LLAMA_JAX_CPU_THREADS'])"
    )
    counts = {}
    for n in (1, 5):
        out = subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, check=True)
        threads, nproc, cpu = out.stdout.split()
        assert nproc == cpu == str(n)
        counts[n] = int(threads)
    assert counts[5] - counts[1] >= 8, counts


@pytest.mark.parametrize("argv", [["serve", "-t", "3"], ["generate", "hi", "--threads", "3"]])
def test_threads_flag_is_applied_before_the_model_loads(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PJRT_NPROC", "")
    monkeypatch.setenv("LLAMA_JAX_CPU_THREADS", "")
    assert main([*argv, "-m", str(tmp_path / "absent.gguf")]) == 1  # fails on the model, after -t
    assert os.environ["PJRT_NPROC"] == os.environ["LLAMA_JAX_CPU_THREADS"] == "3"
    assert main(["serve", "-t", "0"]) == 1 and "--threads must be at least 1" in capsys.readouterr().err
