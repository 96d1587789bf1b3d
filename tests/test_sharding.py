"""Tensor-parallel serving (`llama_jax/sharding.py`).

The partition rules and settings are checked here on abstract meshes; everything that needs
real devices runs on 8 virtual CPU devices in subprocesses (the count is fixed when JAX starts):
`sharding_cases.py` under pytest, `llama-jax serve --mesh data=2,model=4` answering the
official client, and the same mesh served by two processes joined by `jax.distributed`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from llama_jax import sharding

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = shutil.which("llama-jax", path=str(Path(sys.executable).parent)) or "llama-jax"
# The compilation cache directory (LLAMA_JAX_COMPILATION_CACHE, set by conftest) is inherited.
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def abstract(data: int, model: int) -> AbstractMesh:
    return AbstractMesh((data, model), ("data", "model"))


def test_rules_split_heads_mlp_and_vocab_and_replicate_what_does_not_divide():
    mesh = abstract(2, 4)
    # Llama-3.2-1B-like: 8 KV heads split 4 ways; F and V split on model.
    assert sharding.param_spec("blocks/wqkv", (16, 2048, 8, 6, 64), mesh) == P(None, None, "model")
    assert sharding.param_spec("blocks/wo", (16, 8, 4, 64, 2048), mesh) == P(None, "model")
    assert sharding.param_spec("blocks/w_gate_up", (16, 2048, 2, 8192), mesh) == P(None, None, None, "model")
    assert sharding.param_spec("blocks/w_down", (16, 8192, 2048), mesh) == P(None, "model")
    assert sharding.param_spec("embed", (128256, 2048), mesh) == P("model")
    assert sharding.param_spec("lm_head", (128256, 2048), mesh) == P("model")
    assert sharding.param_spec("blocks/attn_norm", (16, 2048), mesh) == P()
    assert sharding.param_spec("inv_freq", (32,), mesh) == P()
    # SmolLM2: 3 KV heads on 4 model devices -> attention replicated, MLP still split.
    assert sharding.param_spec("blocks/wqkv", (30, 576, 3, 5, 64), mesh) == P()
    assert sharding.param_spec("blocks/wo", (30, 3, 3, 64, 576), mesh) == P()
    assert sharding.param_spec("blocks/w_down", (30, 1536, 576), mesh) == P(None, "model")


def test_int8_specs_follow_the_output_major_layout():
    # w_down [L, F, D] split on F, contracted F: q is [L, D, F], scale [L, 1, D].
    assert sharding.int8_specs(P(None, "model"), 3, (-2,)) == (P(None, None, "model"), P(None, None, None))
    # embed [V, D] split on V, per-row scales [V, 1].
    assert sharding.int8_specs(P("model"), 2, (-1,)) == (P("model", None), P("model", None))


def test_mesh_strings():
    assert sharding.make_mesh(None) is None
    mesh = sharding.make_mesh("auto")  # one CPU device in this process
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="needs 8 devices"):
        sharding.make_mesh("data=2,model=4")
    for bad in ("tensor=2", "data=two", "data=0", "model"):
        with pytest.raises(ValueError, match="expected data=D,model=M"):
            sharding.make_mesh(bad)


def test_mesh_reaches_the_model_spec_from_flags_and_environment(monkeypatch):
    from llama_jax.cli import main
    from serve.settings import Settings

    captured = []
    # Only the parsed settings are wanted here; the real server runs in the test below.
    monkeypatch.setattr("serve.server.run", captured.append)
    assert main(["serve", "--mesh", "data=2,model=4", "--max-slots", "4"]) == 0
    spec = captured[0].model_specs()[0]
    assert spec.mesh == "data=2,model=4" and spec.dtype == "auto" and spec.max_slots == 4
    assert Settings.from_env({"LLAMA_JAX_MESH": "model=8"}).model_specs()[0].mesh == "model=8"


def test_auto_dtype_is_float32_on_cpu():
    from llama_jax.weights import resolve_dtype

    assert resolve_dtype("auto") == "float32" and resolve_dtype(None) == "float32"
    assert resolve_dtype("bfloat16") == "bfloat16"


def test_eight_virtual_devices_match_one_device():
    """tests/sharding_cases.py: meshes (1,8), (2,4), (4,2), (8,1) on a tiny model and the
    default model give the one-device tokens and logits, with the rules' layout."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/sharding_cases.py", "-q", "-p", "no:cacheprovider", "-x"],
        cwd=ROOT,
        env={**os.environ, **EIGHT_DEVICES},
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert re.fullmatch(r"10 passed(, \d+ warnings?)? in .*", summary), summary


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768+): gloo and the coordinator bind
    ephemeral ports of their own, and once took the one picked for HTTP."""
    import random

    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`llama-jax serve ARGS` (no warm-up, 2 slots of 128 tokens) logging to log_path."""
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [SCRIPT, "serve", "--no-warmup", "--max-slots", "2", "--max-seq-len", "128", "--no-webui", *args],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(url: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while True:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"a server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(logs[0].read_text()[-3000:])
        time.sleep(0.3)


def stop(procs: list[subprocess.Popen], kill: bool = False) -> None:
    """Terminate (or kill: a process blocked in a cross-process collective, or in
    jax.distributed's exit barrier, does not act on SIGTERM until it returns)."""
    for proc in procs:
        proc.kill() if kill else proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def ask(url: str) -> tuple[str, list[str]]:
    """Greedy chat answer to the README question, plain and streamed, through the official client."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=8)
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=8, stream=True
    )
    return reply.choices[0].message.content, [c.choices[0].delta.content or "" for c in stream if c.choices]


def test_serve_with_a_mesh_answers_chat_and_streams(tmp_path):
    """`llama-jax serve --mesh data=2,model=4` on 8 virtual devices; greedy, it gives the one-device
    answer (tests/test_cli.py pins it)."""
    port, log = free_port(), tmp_path / "server.log"
    procs = [start(["--mesh", "data=2,model=4", "--port", str(port)], EIGHT_DEVICES, log)]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", procs, [log])
        text, chunks = ask(f"http://127.0.0.1:{port}")
    finally:
        stop(procs)
    assert text == "The capital of France is Paris."
    assert len([c for c in chunks if c]) > 1 and "".join(chunks) == text
    assert "backend cpu (cpu), 8 devices, mesh data=2,model=4" in log.read_text()


def test_two_processes_serve_one_mesh_in_lockstep(tmp_path):
    """Multi-host on loopback: two `llama-jax serve` processes of 4 virtual CPU devices, joined by
    jax.distributed (gloo collectives) into one data=2,model=4 mesh. Process 0 serves HTTP and
    broadcasts each device step; process 1 replays them (llama_jax/lockstep.py). A tiny GGUF
    model (4 KV heads: attention split too) keeps it fast; its greedy answer must be the one
    one device gives."""
    from tiny import random_tensors, tiny_config, write_gguf

    from llama_jax import Generator, SamplingParams

    cfg = tiny_config(n_heads=8, n_kv_heads=4, head_dim=8, ffn_dim=256)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, random_tensors(cfg))
    one = Generator.from_pretrained(path, max_slots=2, max_seq_len=128)
    try:
        want = one.chat(MESSAGES, SamplingParams(temperature=0), max_tokens=8).text
    finally:
        one.close()
    port, coordinator = free_port(), free_port()
    env = {**EIGHT_DEVICES, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    common = ["--model", str(path), "--mesh", "data=2,model=4", "--port", str(port)]
    common += ["--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2"]
    procs = [start([*common, "--process-id", str(i)], env, logs[i]) for i in range(2)]
    try:
        wait_healthy(f"http://127.0.0.1:{port}", procs, logs)
        text, chunks = ask(f"http://127.0.0.1:{port}")
    finally:
        stop(procs, kill=True)
    assert want and text == want and "".join(chunks) == want
    assert "2 processes, 8 devices, mesh data=2,model=4" in logs[0].read_text()
    assert "process 1 follows process 0's schedule" in logs[1].read_text()
