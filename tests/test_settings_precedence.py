"""Where the server takes its settings from, each level over the one before: the defaults, the
config file, the `LLAMA_JAX_*` variables, then `llama-jax serve`'s flags; the same for bare
`hypercorn serve.app:app` (which has no flags). Each level is read back from a real server
process: its port, its keys, its slots and its models."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import Server
from tiny import random_tensors, tiny_config, write_gguf

ROOT = Path(__file__).resolve().parent.parent
FILE_KEY, ENV_KEY = "sk-from-the-file-0", "sk-from-the-env-00"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(argv: list[str], env: dict[str, str], cwd: Path, port: int, log: Path) -> Server:
    """A `Server` (conftest) around any command: `llama-jax serve`, or hypercorn in `cwd`."""
    import os

    srv = Server.__new__(Server)
    srv.port, srv.url, srv.base_url, srv.log_path = port, f"http://127.0.0.1:{port}", "", log
    srv._log = open(log, "w")  # noqa: SIM115 - closed in stop()
    srv.proc = subprocess.Popen(
        [sys.executable, *argv],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=srv._log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    return srv


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("precedence") / "tiny-chat.gguf"
    write_gguf(path, cfg, random_tensors(cfg))
    return path


def slots(srv: Server, key: str) -> list[dict]:
    r = httpx.get(srv.url + "/slots", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


def model_names(srv: Server, key: str) -> list[str]:
    r = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def test_llama_jax_serve_takes_flags_over_variables_over_the_file_over_defaults(tiny_gguf):
    config = tiny_gguf.parent / "serve.toml"
    config.write_text(
        f'model = "{tiny_gguf}"\naliases = ["from-file"]\napi_keys = ["{FILE_KEY}"]\n'
        "max_slots = 3\nmax_seq_len = 64\nwarmup = true\n"
    )
    env_port, port = free_port(), free_port()
    env = {
        "LLAMA_JAX_API_KEYS": ENV_KEY,  # over the file's key
        "LLAMA_JAX_MAX_SEQ_LEN": "96",  # over the file's 64
        "LLAMA_JAX_MAX_SLOTS": "2",  # over the file's 3, under the flag's 1
        "LLAMA_JAX_WARMUP": "0",  # over the file's true
        "LLAMA_JAX_PORT": str(env_port),  # under the flag's port
    }
    argv = ["-m", "llama_jax.cli", "serve", "--config", str(config), "--max-slots", "1", "--port", str(port)]
    srv = spawn(argv, env, ROOT, port, tiny_gguf.parent / "serve.log")
    try:
        srv.wait_healthy(timeout=300)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{env_port}/health", timeout=2)
        assert (
            httpx.get(srv.url + "/slots", headers={"Authorization": f"Bearer {FILE_KEY}"}).status_code == 401
        )
        assert [s["n_ctx"] for s in slots(srv, ENV_KEY)] == [96]  # one slot (flag) of 96 (variable)
        assert "from-file" in model_names(srv, ENV_KEY)  # the file where nothing overrides it
        assert httpx.get(srv.url + "/").status_code == 200  # the web page: on by default
        assert "warm-up compiled" not in srv.log()
    finally:
        srv.stop()


def test_hypercorn_takes_variables_over_a_config_file_of_models(tiny_gguf):
    config = tiny_gguf.parent / "hypercorn.toml"
    config.write_text(
        f'api_keys = ["{FILE_KEY}"]\nmax_slots = 3\n\n[[models]]\nmodel = "{tiny_gguf}"\n'
        'aliases = ["from-file"]\nmax_seq_len = 64\n'
    )
    port = free_port()
    env = {
        "LLAMA_JAX_CONFIG": str(config),
        "LLAMA_JAX_API_KEYS": ENV_KEY,
        "LLAMA_JAX_MAX_SEQ_LEN": "96",  # a model setting: applies to the file's models too
        "LLAMA_JAX_MAX_SLOTS": "2",
        "LLAMA_JAX_WARMUP": "0",
    }
    argv = ["-m", "hypercorn", "serve.app:app", "--bind", f"127.0.0.1:{port}"]
    srv = spawn(argv, env, ROOT, port, tiny_gguf.parent / "hypercorn.log")
    try:
        srv.wait_healthy(timeout=300)
        assert (
            httpx.get(srv.url + "/slots", headers={"Authorization": f"Bearer {FILE_KEY}"}).status_code == 401
        )
        assert [s["n_ctx"] for s in slots(srv, ENV_KEY)] == [96, 96]
        assert "from-file" in model_names(srv, ENV_KEY)
    finally:
        srv.stop()


def test_listening_beyond_loopback_without_keys_is_a_warning(tiny_gguf):
    port = free_port()
    argv = [
        "-m",
        "llama_jax.cli",
        "serve",
        "--model",
        str(tiny_gguf),
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
    ]
    srv = spawn(argv, {"LLAMA_JAX_WARMUP": "0"}, ROOT, port, tiny_gguf.parent / "open.log")
    try:
        deadline = time.monotonic() + 120
        while "without API keys" not in srv.log() and time.monotonic() < deadline:
            assert srv.proc.poll() is None, srv.log()
            time.sleep(0.1)
        line = next(ln for ln in srv.log().splitlines() if "without API keys" in ln)
        assert "WARNING" in line and f"0.0.0.0:{port}" in line and "LLAMA_JAX_API_KEYS" in line
    finally:
        srv.stop()


def test_llama_cpp_and_vllm_flags_serve_a_hub_id_over_https(tiny_gguf, tmp_path):
    """`llama-jax serve ORG/NAME:QUANT` (positional, from an offline Hugging Face cache) with
    llama.cpp's `-c -np -a -t` and vLLM's `--served-model-name`, `--strict-model-names` and
    `--ssl-certfile/--ssl-keyfile`: each read back from the running server."""
    import shutil
    import ssl

    import openai
    from tiny import write_hub_cache

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(tiny_gguf, repo / "tiny-chat-Q8_0.gguf")
    write_hub_cache(tmp_path / "hf", "tiny-org/tiny-chat-GGUF", repo)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    argv = ["-m", "llama_jax.cli", "serve", "tiny-org/tiny-chat-GGUF:Q8_0", "-c", "96", "-np", "2"]
    argv += ["-a", "mock", "--served-model-name", "gpt-x", "gpt-y", "--strict-model-names", "-t", "1"]
    argv += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--port", str(port), "--no-warmup"]
    env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    srv = spawn(argv, env, ROOT, port, tmp_path / "flags.log")
    srv.url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        srv.wait_healthy(timeout=300, verify=ctx)
        http = httpx.Client(base_url=srv.url, verify=ctx)
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids == ["tiny-org/tiny-chat-GGUF:Q8_0", "mock", "gpt-x", "gpt-y"]
        assert [s["n_ctx"] for s in http.get("/slots").json()] == [96, 96]
        assert (
            http.get("/props")
            .json()["model_path"]
            .endswith("snapshots/" + _commit(tmp_path) + "/tiny-chat-Q8_0.gguf")
        )
        client = openai.OpenAI(api_key="x", base_url=srv.url + "/v1", http_client=http, max_retries=0)
        kw = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"ignore_eos": True})
        assert client.chat.completions.create(model="gpt-y", **kw).model == "gpt-y"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", **kw)  # --strict-model-names
        assert "listening on https://" in srv.log()
    finally:
        srv.stop()


def _commit(tmp_path: Path) -> str:
    return (tmp_path / "hf" / "models--tiny-org--tiny-chat-GGUF" / "refs" / "main").read_text()
