"""Shared fixtures. The real default model is loaded once per session; most tests use tiny
random models. JAX's persistent compilation cache lives in the repo's `.jax_cache/`."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault(
    "LLAMA_JAX_COMPILATION_CACHE", str(Path(__file__).resolve().parent.parent / ".jax_cache")
)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from llama_jax.model import Llama  # noqa: E402
from llama_jax.xla_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()


@pytest.fixture(scope="session")
def tiny_model() -> Llama:
    """A tiny random model in memory (tests/tiny.py's config and weights)."""
    from tiny import random_tensors, tiny_config

    from llama_jax.weights import build_model, pack_tensors

    cfg = tiny_config()
    return build_model(cfg, pack_tensors(cfg, random_tensors(cfg).items(), "tiny"))


@pytest.fixture(scope="session")
def smollm_meta():
    """(GGUF metadata, path) of the default model, without loading its weights."""
    from llama_jax.gguf import GGUFFile
    from llama_jax.weights import resolve_model_path

    _, path = resolve_model_path(None)
    return GGUFFile(path).metadata, path


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, once per session (float32, 4 slots of 512 positions)."""
    from llama_jax import Generator

    return Generator.from_pretrained(max_seq_len=512, max_slots=4, quantize="none")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


class Server:
    """A real `hypercorn serve.app:app` on a loopback port, configured by environment variables."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = (), scheme: str = "http"):
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hypercorn", "serve.app:app", "--bind", f"127.0.0.1:{self.port}", *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_healthy(self, timeout: float = 600.0, verify: object = True) -> list[int]:
        """Poll /health until 200; the statuses seen on the way."""
        import time

        import httpx

        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                status = httpx.get(self.url + "/health", timeout=5, verify=verify).status_code
            except httpx.TransportError:
                status = 0
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.2)
        raise TimeoutError(f"the server was not healthy after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001 - a server that will not stop is killed
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default model served over HTTP (4 slots of 512 positions, no warm-up for speed)."""
    srv = Server(
        {
            "LLAMA_JAX_MAX_SEQ_LEN": "512",
            "LLAMA_JAX_MAX_SLOTS": "4",
            "LLAMA_JAX_MAX_QUEUE": "64",
            "LLAMA_JAX_WARMUP": "0",
            "LLAMA_JAX_ALIAS": "smollm,my-model",
        },
        tmp_path_factory.mktemp("server") / "server.log",
    )
    try:
        srv.statuses = srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


# A Qwen3-like ChatML template: `enable_thinking: false` writes an empty reasoning block.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """The tiny random model (with THINKING_TEMPLATE, 1024 positions: room for a tool prompt)
    served over HTTP as "tiny"; fast to load, its output gibberish unless a grammar shapes it."""
    from tiny import random_tensors, tiny_config, write_gguf

    folder = tmp_path_factory.mktemp("tiny-server")
    cfg = tiny_config(context_length=1024)
    path = write_gguf(
        folder / "tiny.gguf",
        cfg,
        random_tensors(cfg),
        metadata_overrides={"tokenizer.chat_template": THINKING_TEMPLATE},
    )
    srv = Server(
        {
            "LLAMA_JAX_MODEL": str(path),
            "LLAMA_JAX_ALIAS": "tiny",
            "LLAMA_JAX_MAX_SEQ_LEN": "1024",
            "LLAMA_JAX_MAX_SLOTS": "4",
            "LLAMA_JAX_WARMUP": "0",
        },
        folder / "server.log",
    )
    try:
        srv.wait_healthy(timeout=300)
        yield srv
    finally:
        srv.stop()
