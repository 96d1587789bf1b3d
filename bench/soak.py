"""Soak test of a llama-jax server: concurrent random traffic with faults, then checks.

    python bench/soak.py [--url http://127.0.0.1:8080] [--duration 600] [--clients 16] [--seed 0]

Without `--url` it starts `hypercorn serve.app:app` itself on a free port (the default model,
4 slots of 512 positions, a queue of 16) and stops it at the end. For `--duration` seconds,
`--clients` clients send random requests one after the other: valid chat and text completions
(streamed or not, random sampling values, `n` up to 2), embeddings, streams the client drops
after a few events (a disconnect), and invalid requests (bad JSON, wrong types, values out of
range, an invalid regex, too long for the context; one served model answers any model name).
Halfway, a burst of more requests than the queue holds arrives at once. Afterwards:

- no 5xx but the burst's 503s (`server_is_overloaded`, with `Retry-After`), every error an
  OpenAI error object, every invalid request a 4xx;
- every valid request completed (a `finish_reason` on every choice, or `[DONE]`), was
  cancelled by its client, or was refused by the full queue;
- no slot still live and the queue empty (`/slots`, `/metrics`);
- the server's resident memory grew by less than `--max-rss-growth` (5%) after warm-up (one
  request of each kind, then the soak's first quarter);
- greedy "What is the capital of France?" still answers Paris.

`--hostile` runs the other check instead: a normal 64-token stream alone (its quiet
inter-token latency), then again while hostile requests run: an embeddings flood of
`--docs` documents of ~450 tokens, `n`=2 streams dropped after a few events, one after the
other, streams with 16 stop strings of 256 characters held back, a JSON schema whose regex
(`^(x{300}){300}$`) would cost ~40 ms per token if accepted, with n=4, and `/health` polled
throughout. It passes when the loaded median inter-token latency is within 3x the quiet one,
the first token comes within 10 s, the longest gap is under 5 s, the schema is refused with a
400 within 5 s, and `/health` answers 200 within 1 s every time.

Prints one table and exits 1 when a check fails. tests/test_soak.py runs a 60-second soak in CI
against the test server; the long one is `pytest -m soak` (`LLAMA_JAX_SOAK_SECONDS`) or this script.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [  # a few lengths, so that warm-up meets every prefill shape the soak uses
    "Hi!",
    "Tell me about the sea.",
    "Write a short poem about autumn leaves falling in a quiet park at dusk.",
    "Explain, in a few sentences, why the sky is blue and why sunsets are red. " * 3,
]
INVALID = [  # (body, raw bytes or None); each must get a 4xx
    (None, b'{"model": "x", "messages": ['),
    (None, b"[]"),
    ({"model": MODEL}, None),
    ({"model": MODEL, "messages": "hi"}, None),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, None),
    ({"model": MODEL, "messages": FRANCE, "temperature": 3}, None),
    ({"model": MODEL, "messages": FRANCE, "top_p": -1}, None),
    ({"model": MODEL, "messages": FRANCE, "n": 0}, None),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": "ten"}, None),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": 10**6}, None),
    ({"model": MODEL, "messages": FRANCE, "logit_bias": {"not-a-token": 1}}, None),
    ({"model": MODEL, "messages": FRANCE, "structured_outputs": {"regex": "[unclosed"}}, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}, None),
]


@dataclasses.dataclass
class Report:
    sent: int = 0
    completed: int = 0
    disconnects: int = 0
    invalid_4xx: int = 0
    burst: int = 0
    burst_rejected: int = 0
    burst_accepted: int = 0
    unexpected: list[str] = dataclasses.field(default_factory=list)  # each a failure, with why
    rss_before: int = 0
    rss_after: int = 0
    seconds: float = 0.0
    server_errors: int = 0  # 5xx other than the full queue's 503

    @property
    def rss_growth(self) -> float:
        return (self.rss_after - self.rss_before) / self.rss_before if self.rss_before else 0.0

    def table(self) -> str:
        rows = [
            ("requests sent", self.sent),
            ("completed", self.completed),
            ("disconnects (by the client)", self.disconnects),
            ("invalid requests answered 4xx", self.invalid_4xx),
            ("burst: sent / served / 503", f"{self.burst} / {self.burst_accepted} / {self.burst_rejected}"),
            ("5xx seen (besides the burst's 503)", self.server_errors),
            ("other failures", len(self.unexpected)),
            (
                "RSS after warm-up / at end (MiB)",
                f"{self.rss_before / 2**20:.0f} / {self.rss_after / 2**20:.0f}",
            ),
            ("RSS growth", f"{self.rss_growth:+.1%}"),
            ("time (s)", f"{self.seconds:.0f}"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"| {k:<{width}} | {v!s:>14} |" for k, v in rows)


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its children (hypercorn serves in a worker process)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024
    return total


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out + [g for c in out for g in _children(c)]


class Soak:
    def __init__(self, url: str, report: Report, rng: random.Random):
        self.url = url
        self.report = report
        self.rng = rng

    def fail(self, why: str) -> None:
        self.report.unexpected.append(why)

    def _check_error(self, r: httpx.Response, what: str) -> None:
        try:
            err = r.json()["error"]
            ok = isinstance(err["message"], str) and (err["code"] is None or isinstance(err["code"], str))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            self.fail(f"{what}: {r.status_code} is not an OpenAI error object: {r.text[:200]}")
        if r.status_code >= 500 and not (r.status_code == 503 and "Retry-After" in r.headers):
            self.report.server_errors += 1
            self.fail(f"{what}: {r.status_code} {r.text[:200]}")

    def valid_body(self) -> tuple[str, dict]:
        rng = self.rng
        body: dict = {"model": MODEL, "max_tokens": rng.randint(1, 24), "seed": rng.randint(0, 2**31)}
        if rng.random() < 0.5:
            body.update(temperature=rng.uniform(0, 2), top_p=rng.uniform(0.05, 1), top_k=rng.randint(0, 50))
        if rng.random() < 0.2:
            body.update(presence_penalty=rng.uniform(-2, 2), stop=["\n", "."], n=rng.randint(1, 2))
        if rng.random() < 0.2:
            body["ignore_eos"] = True
        prompt = rng.choice(PROMPTS)
        if rng.random() < 0.75:
            body["messages"] = [{"role": "user", "content": prompt}]
            if rng.random() < 0.2:
                body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
            return "/v1/chat/completions", body
        body["prompt"] = prompt
        return "/v1/completions", body

    async def one(self, client: httpx.AsyncClient) -> None:
        r = self.rng.random()
        self.report.sent += 1
        if r < 0.2:
            body, raw = self.rng.choice(INVALID)
            kw = {"content": raw, "headers": {"Content-Type": "application/json"}} if raw else {"json": body}
            resp = await client.post("/v1/chat/completions", **kw)
            if 400 <= resp.status_code < 500:
                self.report.invalid_4xx += 1
                self._check_error(resp, "invalid request")
            else:
                self.fail(f"invalid request {body or raw!r:.80} got {resp.status_code}")
                self._check_error(resp, "invalid request")
            return
        if r < 0.27:
            resp = await client.post(
                "/v1/embeddings", json={"model": MODEL, "input": self.rng.choice(PROMPTS)}
            )
            self._settle(resp, "embeddings", lambda b: len(b["data"]) == 1)
            return
        path, body = self.valid_body()
        if r < 0.45:  # a stream the client drops after a few events
            body.update(stream=True, max_tokens=64, ignore_eos=True)
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    return self._settle(resp, "dropped stream", None)
                keep = self.rng.randint(1, 4)
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        keep -= 1
                        if keep == 0:
                            break
            self.report.disconnects += 1
            return
        if r < 0.7:
            body["stream"] = True
            async with client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    return self._settle(resp, "stream", None)
                events = [line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")]
            if events and events[-1] == "[DONE]":
                self.report.completed += 1
            else:
                self.fail(f"stream without [DONE]: {events[-2:]}")
                if events and "error" in events[-1]:
                    self.report.server_errors += 1
            return
        resp = await client.post(path, json=body)
        self._settle(resp, path, lambda b: all(c["finish_reason"] for c in b["choices"]))

    def _settle(self, resp: httpx.Response, what: str, complete) -> None:
        if resp.status_code == 200 and complete is not None:
            if complete(resp.json()):
                self.report.completed += 1
            else:
                self.fail(f"{what}: incomplete answer {resp.text[:200]}")
        elif resp.status_code == 503 and resp.headers.get("Retry-After"):
            self.report.burst_rejected += 1  # the full queue: a client met the burst
            self._check_error(resp, what)
        else:
            self._check_error(resp, what)
            self.fail(f"{what}: {resp.status_code} {resp.text[:200]}")

    async def client(self, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            while time.monotonic() < deadline:
                refused = self.report.burst_rejected
                try:
                    await self.one(client)
                except httpx.HTTPError as e:
                    self.fail(f"transport error: {e!r}")
                if self.report.burst_rejected > refused:
                    await asyncio.sleep(1.0)  # Retry-After, as a polite client does

    async def burst(self, size: int) -> None:
        self.report.burst += size
        body = {"model": MODEL, "messages": FRANCE, "max_tokens": 4, "ignore_eos": True}
        limits = httpx.Limits(max_connections=size)
        # From an address of its own: the server gives each client (address, without API keys)
        # a share of the queue, and the soak's other clients hold 127.0.0.1's.
        transport = httpx.AsyncHTTPTransport(local_address=BURST_ADDRESS, limits=limits)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, transport=transport) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(size)), return_exceptions=True
            )
        for a in answers:
            if isinstance(a, BaseException):
                self.fail(f"burst: {a!r}")
            elif a.status_code == 200:
                self.report.completed += 1
                self.report.burst_accepted += 1
            elif a.status_code == 503 and a.headers.get("Retry-After"):
                self.report.burst_rejected += 1
                self._check_error(a, "burst")
            else:
                self._check_error(a, "burst")
                self.fail(f"burst: {a.status_code} {a.text[:200]}")
        self.report.sent += size


BURST_ADDRESS = "127.0.0.2"  # loopback too (127.0.0.0/8), a client of its own


async def warm_up(url: str) -> None:
    """Every prompt, streamed and not, chat and text, with and without logprobs: after this no
    request of the soak compiles anything new, so memory growth is growth."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        for prompt in PROMPTS:
            for extra in ({}, {"logprobs": True, "top_logprobs": 2, "n": 2}):
                msg = [{"role": "user", "content": prompt}]
                await c.post(
                    "/v1/chat/completions", json={"model": MODEL, "messages": msg, "max_tokens": 2, **extra}
                )
            await c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
            await c.post("/v1/embeddings", json={"model": MODEL, "input": prompt})


async def settled(url: str, timeout: float = 30.0) -> str | None:
    """None once no slot is live and nothing waits; else what is still there."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        while True:
            slots = (await c.get("/slots")).json()
            metrics = (await c.get("/metrics")).text
            gauges = [
                line
                for line in metrics.splitlines()
                if line.startswith(("llama_jax_queue_length", "llama_jax_live_slots"))
            ]
            live = [s for s in slots if s["is_processing"]]
            queued = [g for g in gauges if float(g.split()[-1]) != 0]
            if not live and not queued:
                return None
            if time.monotonic() > deadline:
                return f"live slots {live}, queue {queued}"
            await asyncio.sleep(0.25)


async def soak(
    url: str, pid: int, duration: float, clients: int = 16, burst: int = 40, seed: int = 0
) -> Report:
    """Run the soak against the server at `url` (process `pid`); `burst` must exceed the
    server's slots plus queue (4 + 16 for the server `main` starts)."""
    report = Report()
    rng = random.Random(seed)
    await warm_up(url)
    runner = Soak(url, report, rng)
    t0 = time.monotonic()
    deadline = t0 + duration

    async def burst_later() -> None:
        # The first quarter of the traffic is the rest of the warm-up (allocators settle).
        await asyncio.sleep(duration / 4)
        report.rss_before = rss_bytes(pid)
        await asyncio.sleep(duration / 4)
        await runner.burst(burst)

    await asyncio.gather(burst_later(), *(runner.client(deadline) for _ in range(clients)))
    report.seconds = time.monotonic() - t0
    left = await settled(url)
    if left:
        runner.fail(f"after the soak: {left}")
    report.rss_after = rss_bytes(pid)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 12},
        )
        if r.status_code != 200 or "Paris" not in r.json()["choices"][0]["message"]["content"]:
            runner.fail(f"after the soak the server answered {r.status_code} {r.text[:200]}")
    return report


@dataclasses.dataclass
class HostileReport:
    quiet_itl: float = 0.0  # median seconds between tokens of the normal stream, alone
    loaded_itl: float = 0.0  # ... while the hostile requests run
    loaded_max_gap: float = 0.0
    loaded_ttft: float = 0.0
    health_max_s: float = 0.0  # the slowest /health answer meanwhile
    health_statuses: set = dataclasses.field(default_factory=set)
    flood_running_at_end: bool = False  # the embeddings flood overlapped the whole measurement
    dropped_groups: int = 0
    regex_bomb: tuple[int, float] = (0, 0.0)  # status and seconds of a schema with a 90,000-x regex
    stop_bomb_streams: int = 0  # streams with 16 stop strings of 256 characters each, meanwhile
    left: str | None = None  # what was still live after the clients left (None: nothing)

    @property
    def failures(self) -> list[str]:
        out = []
        if self.loaded_itl > 3 * self.quiet_itl:
            out.append(f"median inter-token latency {self.loaded_itl:.3f} s > 3x {self.quiet_itl:.3f} s")
        if self.loaded_ttft > 10 or self.loaded_max_gap > 5:
            out.append(f"first token after {self.loaded_ttft:.1f} s, longest gap {self.loaded_max_gap:.1f} s")
        if self.health_max_s > 1.0 or self.health_statuses != {200}:
            out.append(f"/health: slowest {self.health_max_s:.2f} s, statuses {self.health_statuses}")
        if self.regex_bomb[0] != 400 or self.regex_bomb[1] > 5:
            out.append(
                f"regex-bomb schema: {self.regex_bomb[0]} after {self.regex_bomb[1]:.1f} s (want a quick 400)"
            )
        if self.left:
            out.append(f"after the clients left: {self.left}")
        return out

    def table(self) -> str:
        rows = [
            (
                "normal stream: median ITL quiet / loaded (ms)",
                f"{self.quiet_itl * 1e3:.1f} / {self.loaded_itl * 1e3:.1f}",
            ),
            ("loaded: first token / longest gap (s)", f"{self.loaded_ttft:.2f} / {self.loaded_max_gap:.2f}"),
            (
                "/health: slowest answer (s), statuses",
                f"{self.health_max_s:.3f} {sorted(self.health_statuses)}",
            ),
            ("flood still running at the end", self.flood_running_at_end),
            ("n=2 streams dropped", self.dropped_groups),
            ("regex-bomb schema (n=4): status / s", f"{self.regex_bomb[0]} / {self.regex_bomb[1]:.2f}"),
            ("16 x 256-char stop streams meanwhile", self.stop_bomb_streams),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"| {k:<{width}} | {v!s:>16} |" for k, v in rows)


async def _normal_stream(client: httpx.AsyncClient) -> tuple[float, list[float]]:
    """(time to first token, gaps between tokens) of a greedy 64-token chat stream."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 64}
    body.update(stream=True, temperature=0, ignore_eos=True)
    t0 = time.monotonic()
    times = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                times.append(time.monotonic())
    return times[0] - t0, [b - a for a, b in itertools.pairwise(times)]


async def hostile(url: str, docs: int = 128) -> HostileReport:
    """The hostile check of `--hostile` (see the module docstring)."""
    import statistics

    report = HostileReport()
    timeout = httpx.Timeout(300.0)
    inputs = [f"Document {i} talks about the sea, the sky and the land. " * 30 for i in range(docs)]
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
        # Compile what the check meets (a server without warm-up would compile mid-stream).
        r = await c.post("/v1/embeddings", json={"model": MODEL, "input": inputs[:2]})
        r.raise_for_status()
        await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 2, "n": 2})
        await _normal_stream(c)
        _, gaps = await _normal_stream(c)
        report.quiet_itl = statistics.median(gaps)
    stop = asyncio.Event()
    flood_done = asyncio.Event()

    async def flood() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            try:
                await c.post("/v1/embeddings", json={"model": MODEL, "input": inputs})
            finally:
                flood_done.set()

    async def groups() -> None:
        body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 200, "n": 2, "stream": True}
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            while not stop.is_set():
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen >= 6:
                            break
                report.dropped_groups += 1

    async def regex_bomb() -> None:
        schema = {"type": "string", "pattern": "^(x{300}){300}$"}  # the 47-byte schema
        fmt = {"type": "json_schema", "json_schema": {"name": "bomb", "schema": schema}}
        body = {"model": MODEL, "messages": FRANCE, "response_format": fmt, "n": 4, "max_tokens": 50}
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            t0 = time.monotonic()
            r = await c.post("/v1/chat/completions", json=body)
            report.regex_bomb = (r.status_code, time.monotonic() - t0)

    async def stop_bomb() -> None:
        stops = [chr(ord("a") + i) * 255 + "!" for i in range(16)]  # never match; all held back
        body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 200, "stop": stops, "stream": True}
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            while not stop.is_set():
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        if stop.is_set():
                            break
                report.stop_bomb_streams += 1

    async def health() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                r = await c.get("/health")
                report.health_max_s = max(report.health_max_s, time.monotonic() - t0)
                report.health_statuses.add(r.status_code)
                await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(f()) for f in (flood, groups, regex_bomb, stop_bomb, health)]
    await asyncio.sleep(2.0)  # the flood and the groups are under way
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
        report.loaded_ttft, gaps = await _normal_stream(c)
    report.loaded_itl, report.loaded_max_gap = statistics.median(gaps), max(gaps)
    report.flood_running_at_end = not flood_done.is_set()
    stop.set()
    for t in tasks:
        t.cancel()  # the flood's client leaves: the server must drop the rest of its work
    await asyncio.gather(*tasks, return_exceptions=True)
    report.left = await settled(url, timeout=10)
    return report


def _start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "LLAMA_JAX_MAX_SEQ_LEN": "512",
        "LLAMA_JAX_MAX_SLOTS": "4",
        "LLAMA_JAX_MAX_QUEUE": "16",
        "LLAMA_JAX_WARMUP": "0",  # warm_up() compiles what the soak uses
    }
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "serve.app:app", "--bind", f"127.0.0.1:{port}"], env=env, cwd=root
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise TimeoutError("the server did not become healthy")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--pid", type=int, help="its process id, for the memory check (with --url)")
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--burst", type=int, default=40, help="requests at once, more than slots + queue")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument("--hostile", action="store_true", help="the hostile-requests check instead")
    ap.add_argument("--docs", type=int, default=128, help="--hostile: documents in the embeddings flood")
    args = ap.parse_args()
    proc = None
    if args.url:
        url, pid = args.url, args.pid or 0
    else:
        proc, url = _start_server()
        pid = proc.pid
    try:
        if args.hostile:
            hostile_report = asyncio.run(hostile(url, args.docs))
            print(hostile_report.table())
            for why in hostile_report.failures:
                print("FAIL:", why)
            return 1 if hostile_report.failures else 0
        report = asyncio.run(soak(url, pid, args.duration, args.clients, args.burst, args.seed))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(report.table())
    for why in report.unexpected[:20]:
        print("FAIL:", why)
    bad = report.unexpected or report.server_errors or (pid and report.rss_growth > args.max_rss_growth)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
