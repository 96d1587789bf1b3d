"""The scheduler thread and its bridges: asyncio streams, blocking streams, cancellation, device
calls, and what callers see when the thread dies."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest
from tiny import gguf_metadata, random_tensors, tiny_config

from llama_jax.errors import ContextLengthError, EngineDeadError, OverloadedError
from llama_jax.runner import ModelRunner
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Scheduler
from llama_jax.scheduler_loop import SchedulerLoop
from llama_jax.stopping import StopRules
from llama_jax.tokenizer import Tokenizer
from llama_jax.weights import build_model, pack_tensors

GREEDY = SamplingParams(temperature=0), StopRules(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config()
    model = build_model(cfg, pack_tensors(cfg, random_tensors(cfg).items(), "tiny"))
    return ModelRunner(
        model, max_slots=4, max_seq_len=128, max_prefill_chunk=32
    ), Tokenizer.from_gguf_metadata(gguf_metadata(cfg), "tiny")


@pytest.fixture
def loop(parts):
    runner, tokenizer = parts
    lp = SchedulerLoop(Scheduler(runner, tokenizer, max_queue=200)).start()
    yield lp
    lp.close()


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, int(rng.integers(2, 60))).tolist() for _ in range(n)]


def reference(parts, prompt, params=GREEDY):
    """The same request on a fresh scheduler driven synchronously."""
    runner, tokenizer = parts
    scheduler = Scheduler(runner, tokenizer)
    req = scheduler.submit(prompt, *params)
    while not req.finished:
        scheduler.step()
    return req.output_ids


async def collect(loop, prompt, params=GREEDY):
    ids, text, last = [], [], None
    async for d in loop.astream(prompt, *params):
        ids += d.token_ids
        text.append(d.text)
        last = d
    return ids, "".join(text), last


def test_concurrent_async_streams_equal_separate_runs(loop, parts):
    ps = prompts(10)  # more requests than the 4 slots

    async def main():
        return await asyncio.gather(*(collect(loop, p) for p in ps))

    results = asyncio.run(main())
    for p, (ids, _, last) in zip(ps, results, strict=True):
        assert ids == reference(parts, p)
        assert last.finish_reason == "length"
        assert last.usage.prompt_tokens == len(p) and last.usage.completion_tokens == 10
    assert loop.call(lambda: loop.scheduler.live_slots) == 0


def test_blocking_stream_from_several_threads(loop, parts):
    ps = prompts(6, seed=1)
    out: dict[int, list[int]] = {}

    def worker(i):
        out[i] = [t for d in loop.stream(ps[i], *GREEDY) for t in d.token_ids]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(out[i] == reference(parts, ps[i]) for i in range(len(ps)))


def test_hundred_cancelled_streams_leave_every_slot_free(loop, parts):
    long = SamplingParams(temperature=0.8), StopRules(max_tokens=60, ignore_eos=True)

    async def cancel_after_first(p):
        gen = loop.astream(p, *long)
        await gen.__anext__()
        await gen.aclose()  # what a disconnecting HTTP client does

    async def cancel_task(p):
        task = asyncio.ensure_future(collect(loop, p, long))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def main():
        ps = prompts(100, seed=2)
        await asyncio.gather(*(cancel_after_first(p) for p in ps[:70]), *(cancel_task(p) for p in ps[70:]))

    asyncio.run(main())
    state = loop.call(lambda: (loop.scheduler.live_slots, len(loop.scheduler.waiting)))
    assert state == (0, 0)
    p = prompts(1, seed=3)[0]
    ids, _, last = asyncio.run(collect(loop, p))
    assert ids == reference(parts, p) and last.finish_reason == "length"


def test_bad_requests_fail_on_the_callers_thread(loop):
    with pytest.raises(ContextLengthError):
        loop.submit(list(range(3, 120)), SamplingParams(), StopRules(max_tokens=20), lambda _: None)


def test_full_queue_is_refused_at_once(parts):
    runner, tokenizer = parts
    lp = SchedulerLoop(Scheduler(runner, tokenizer, max_queue=3))  # not started: nothing drains the inbox
    lp._thread.is_alive = lambda: True  # submits are accepted, then count against the queue
    for _ in range(3):
        lp.submit([5, 6], *GREEDY, lambda _: None)
    with pytest.raises(OverloadedError):
        lp.submit([5, 6], *GREEDY, lambda _: None)


def test_engine_failure_reaches_every_waiting_caller_and_later_submits(parts):
    runner, tokenizer = parts
    scheduler = Scheduler(runner, tokenizer)
    lp = SchedulerLoop(scheduler).start()
    original = scheduler.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected device fault")
        original()

    scheduler.step = failing_step

    async def main():
        return await asyncio.gather(
            *(
                collect(lp, p, (SamplingParams(), StopRules(max_tokens=50, ignore_eos=True)))
                for p in prompts(6, seed=4)
            ),
            return_exceptions=True,
        )

    results = asyncio.run(asyncio.wait_for(main(), 60))
    assert all(isinstance(r, EngineDeadError) and "injected device fault" in str(r) for r in results)
    with pytest.raises(EngineDeadError):
        lp.submit([5, 6], *GREEDY, lambda _: None)
    with pytest.raises(EngineDeadError):
        list(lp.stream([5, 6], *GREEDY))


def test_device_calls_run_on_the_engine_thread(loop):
    names = loop.call(lambda: threading.current_thread().name)
    assert names == "llama-jax-engine"
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda: 1 / 0)
    assert loop.running  # an error in a call is the caller's, not the scheduler's


def test_a_broken_consumer_loses_its_request_not_the_engine(loop, parts):
    def broken(_):
        raise RuntimeError("consumer gone")

    req = loop.submit([5, 6, 7], SamplingParams(), StopRules(max_tokens=50, ignore_eos=True), broken)
    p = prompts(1, seed=5)[0]
    assert [t for d in loop.stream(p, *GREEDY) for t in d.token_ids] == reference(parts, p)
    assert req.finish_reason == "cancelled" and loop.running


def test_streams_from_a_finished_event_loop_do_not_hurt_the_engine(loop, parts):
    """A consumer whose event loop closed before its cancel reached the scheduler thread."""

    async def first_delta_only(p):
        gen = loop.astream(p, SamplingParams(), StopRules(max_tokens=40, ignore_eos=True))
        await gen.__anext__()  # never closed: the loop ends with the request still running

    for seed in range(5):
        asyncio.run(first_delta_only(prompts(1, seed=seed)[0]))
    p = prompts(1, seed=9)[0]
    assert [t for d in loop.stream(p, *GREEDY) for t in d.token_ids] == reference(parts, p)
    assert loop.running


def test_group_of_samples_streams_to_each_sink(loop):
    got: dict[int, list[int]] = {0: [], 1: []}
    done = [threading.Event(), threading.Event()]

    def sink(i):
        def on(d):
            got[i].extend(d.token_ids)
            if d.finish_reason:
                done[i].set()

        return on

    group = loop.submit_group(
        [5, 6, 7, 8],
        SamplingParams(temperature=1.0, seed=3),
        StopRules(max_tokens=6, ignore_eos=True),
        [sink(0), sink(1)],
    )
    assert all(e.wait(60) for e in done)
    assert got[0] == group[0].output_ids and got[1] == group[1].output_ids
    assert group[1].cached_tokens == 3


def test_first_tokens_are_delivered_one_prefill_apart(loop, parts):
    """Three prompts admitted in one step: each caller gets its first token right after its own
    prefill (the loop delivers mid-step), not after all three."""
    runner, _ = parts
    prefills = []
    prefill = runner.prefill

    def counting_prefill(*args):
        prefills.append(1)
        return prefill(*args)

    release = threading.Event()
    blocked = loop.call_async(release.wait)  # hold the scheduler thread so the three arrive together
    first_at, done = {}, threading.Event()

    def sink_for(i):
        def sink(d):
            if d.token_ids and i not in first_at:
                first_at[i] = len(prefills)
            if d.finish_reason and len(first_at) == 3:
                done.set()

        return sink

    runner.prefill = counting_prefill
    try:
        for i, p in enumerate(prompts(3, seed=5)):
            loop.submit(p[:8], *GREEDY, sink_for(i))
        release.set()
        blocked.result(timeout=60)
        assert done.wait(timeout=120)
    finally:
        del runner.prefill
    assert first_at == {0: 1, 1: 2, 2: 3}


def test_embeddings_are_computed_in_chunks_and_a_cancel_stops_them(loop, parts):
    runner, _ = parts
    rows = prompts(20, seed=3)
    rows = [r[:32] for r in rows]  # within the tiny runner's embedding buckets
    np.testing.assert_allclose(loop.embed(rows), runner.embed(rows), rtol=1e-5, atol=1e-6)
    gate = threading.Event()
    loop.call_async(gate.wait)  # hold the thread so that the cancel lands mid-request
    job, fut = loop.submit_embedding(rows * 20)
    loop.cancel_embedding(job)
    gate.set()
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(30)
    assert job.done < len(job.rows) and not loop.scheduler.embeddings


def test_stalled_for_counts_only_while_work_waits_on_a_long_call(loop):
    time.sleep(0.3)
    assert loop.stalled_for() == 0.0  # idle is not stalled
    gate = threading.Event()
    done = loop.call_async(gate.wait)  # a device call that does not return
    time.sleep(0.5)
    assert loop.stalled_for() >= 0.4
    gate.set()
    done.result(10)
    loop.call(lambda: None)
    time.sleep(0.2)
    assert loop.stalled_for() == 0.0
