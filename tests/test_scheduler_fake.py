"""The scheduler on a fake runner (tests/fake_runner.py) whose next token is always the last one
plus one: exact token sequences, texts and schedules for continuous batching, limits, stops,
cancellation, n-sample groups and prefix reuse. Byte b is token 3 + b in the tiny vocabulary,
so the token after "a" is "b"."""

from __future__ import annotations

import pytest
from fake_runner import FakeRunner
from tiny import gguf_metadata, tiny_config

from llama_jax.constrain import Grammar
from llama_jax.errors import ContextLengthError, OverloadedError
from llama_jax.lockstep import LeaderRunner
from llama_jax.runner import Runner
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Scheduler
from llama_jax.stopping import StopRules
from llama_jax.tokenizer import Tokenizer

CFG = tiny_config()
TOKENIZER = Tokenizer.from_gguf_metadata(gguf_metadata(CFG), "tiny")
GREEDY = SamplingParams(temperature=0)


def ids(text: str) -> list[int]:
    return [3 + b for b in text.encode()]


def make(max_slots: int = 2, max_seq_len: int = 64, chunk: int = 8, **kwargs) -> tuple[Scheduler, FakeRunner]:
    runner = FakeRunner(CFG, max_slots, max_seq_len, chunk)
    return Scheduler(runner, TOKENIZER, **kwargs), runner


def run(scheduler: Scheduler, reqs, max_steps: int = 500):
    for _ in range(max_steps):
        if all(r.finished for r in reqs):
            return reqs
        scheduler.step()
    raise AssertionError("requests did not finish")


def prefills(runner: FakeRunner) -> list[tuple]:
    return [c for c in runner.calls if c[0] == "prefill"]


def test_a_request_counts_up_from_its_last_prompt_token():
    scheduler, _ = make()
    (r,) = run(scheduler, [scheduler.submit(ids("abc"), GREEDY, StopRules(max_tokens=4))])
    assert r.output_ids == ids("defg") and r.text == "defg"
    assert r.output_logprobs == [-1.0] * 4
    deltas = list(r.deltas)
    assert [(d.text, d.token_ids) for d in deltas] == [(c, tuple(ids(c))) for c in "defg"] + [("", ())]
    assert [d.finish_reason for d in deltas] == [None, None, None, None, "length"]
    assert deltas[-1].usage.prompt_tokens == 3 and deltas[-1].usage.completion_tokens == 4


def test_top_logprobs_are_the_tokens_after_the_sampled_one():
    scheduler, _ = make()
    params = SamplingParams(temperature=0, top_logprobs=2)
    (r,) = run(scheduler, [scheduler.submit(ids("a"), params, StopRules(max_tokens=2))])
    tops = [t for d in r.deltas for t in d.top_logprobs]
    assert tops == [((ids("b")[0], -1.0), (ids("c")[0], -2.0)), ((ids("c")[0], -1.0), (ids("d")[0], -2.0))]


def test_admission_is_oldest_first_and_a_finished_slot_takes_the_next_request():
    scheduler, runner = make(max_slots=2)
    a = scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=2))
    b = scheduler.submit(ids("k"), GREEDY, StopRules(max_tokens=6))
    c = scheduler.submit(ids("x"), GREEDY, StopRules(max_tokens=2))
    scheduler.step()
    assert (a.slot, b.slot, c.slot) == (0, 1, None) and list(scheduler.waiting) == [c]
    run(scheduler, [a])
    run(scheduler, [b, c])
    assert prefills(runner) == [("prefill", 0, 0, 1), ("prefill", 1, 0, 1), ("prefill", 0, 0, 1)]
    assert (a.text, b.text, c.text) == ("bc", "lmnopq", "yz")


def test_max_tokens_fills_the_context_exactly_and_no_further():
    scheduler, _ = make(max_seq_len=16)
    with pytest.raises(ContextLengthError):
        scheduler.submit(ids("abcdefghijkl"), GREEDY, StopRules(max_tokens=5))
    (r,) = run(scheduler, [scheduler.submit(ids("abcdefghijkl"), GREEDY, StopRules(max_tokens=4))])
    assert r.text == "mnop" and r.finish_reason == "length"


def test_a_stop_string_across_tokens_ends_the_output_and_is_left_out():
    scheduler, _ = make()
    (r,) = run(scheduler, [scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=20, stop=["de"]))])
    assert r.output_ids == ids("bcde") and r.text == "bc" and r.finish_reason == "stop"
    assert [d.text for d in r.deltas] == ["b", "c", "", "", ""]  # "d" is held back: it may start "de"


def test_a_stop_token_or_eos_ends_the_output_with_the_token_but_not_its_text():
    scheduler, _ = make()
    (r,) = run(
        scheduler, [scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=10, stop_token_ids=ids("e")))]
    )
    assert r.output_ids == ids("bcde") and r.text == "bcd" and r.finish_reason == "stop"
    scheduler.eos_ids = frozenset(ids("d"))
    (r,) = run(scheduler, [scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=10))])
    assert r.text == "bc" and r.finish_reason == "stop"
    (r,) = run(scheduler, [scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=5, ignore_eos=True))])
    assert r.text == "bcdef" and r.finish_reason == "length"


def test_cancel_drops_a_waiting_request_and_frees_a_running_ones_slot():
    scheduler, runner = make(max_slots=1)
    running = scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=50))
    waiting = scheduler.submit(ids("m"), GREEDY, StopRules(max_tokens=3))
    scheduler.step()
    scheduler.cancel(waiting)
    assert waiting.finish_reason == "cancelled" and not scheduler.waiting and not waiting.deltas
    scheduler.step()
    scheduler.cancel(running)
    assert running.finish_reason == "cancelled" and scheduler.live_slots == 0
    after = scheduler.submit(ids("x"), GREEDY, StopRules(max_tokens=2))
    run(scheduler, [after])
    assert after.text == "yz" and after.slot is None
    assert [c[1:] for c in prefills(runner)] == [(0, 0, 1), (0, 0, 1)]  # the cancelled one never ran


def test_n_samples_prefill_the_prompt_once_and_copy_it():
    scheduler, runner = make(max_slots=3, chunk=8)
    prompt = ids("the quick fox")  # 13 tokens: two chunks for the first sample
    params = SamplingParams(temperature=1.0, seed=7)
    group = scheduler.make_group(prompt, params, StopRules(max_tokens=3), 3)
    assert [r.seed for r in group] == [7, 8, 9] and [r.id for r in group[1:]] == ["req-0-1", "req-0-2"]
    for r in group:
        scheduler.enqueue(r)
    run(scheduler, group)
    calls = [c for c in runner.calls if c[0] in ("prefill", "copy")]
    assert calls == [
        ("prefill", 0, 0, 8),
        ("prefill", 0, 8, 5),
        ("copy", 0, 1, 12),
        ("prefill", 1, 12, 1),
        ("copy", 0, 2, 12),
        ("prefill", 2, 12, 1),
    ]
    assert [r.text for r in group] == ["yz{"] * 3 and [r.cached_tokens for r in group] == [0, 12, 12]


def test_an_idle_slot_that_holds_the_start_of_a_prompt_is_reused():
    scheduler, runner = make(max_slots=2)
    (first,) = run(scheduler, [scheduler.submit(ids("hello"), GREEDY, StopRules(max_tokens=3))])
    assert first.text == "pqr"
    follow_up = ids("hellopqr ok")
    (second,) = run(scheduler, [scheduler.submit(follow_up, GREEDY, StopRules(max_tokens=2))])
    # The slot holds the prompt and the outputs but the last (whose K/V may not be written).
    assert second.cached_tokens == len(ids("hellopq"))
    assert prefills(runner)[-1] == ("prefill", 0, 7, 4)
    assert scheduler.state.cache[0][: len(follow_up) + 1] == follow_up + ids("l")
    assert second.text == "lm"


def test_long_prompts_prefill_a_chunk_per_step_while_a_stream_keeps_decoding():
    scheduler, runner = make(max_slots=2, chunk=8)
    stream = scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=30))
    scheduler.step()
    scheduler.step()
    long = scheduler.submit(ids("x" * 24), GREEDY, StopRules(max_tokens=1))
    before = len(stream.output_ids)
    for _ in range(3):
        scheduler.step()
        assert runner.calls[-1] == ("decode", (0,))  # every step still decodes the stream
    assert [c[1:] for c in prefills(runner)[1:]] == [(1, 0, 8), (1, 8, 8), (1, 16, 8)]
    assert len(stream.output_ids) == before + 3 and long.text == "y"


def test_the_queue_is_bounded_and_one_client_gets_only_its_share():
    scheduler, _ = make(max_queue=4)  # one client may hold 4 // 4 = 1 waiting request
    scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=10), client="k")
    with pytest.raises(OverloadedError, match="per client"):
        scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=10), client="k")
    scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=10), client="j")  # another client still gets in
    for _ in range(2):
        scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=10))
    with pytest.raises(OverloadedError, match="queue is full"):
        scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=10))


def test_a_grammar_skips_the_tokens_it_does_not_allow():
    scheduler, _ = make()
    (r,) = run(
        scheduler,
        [scheduler.submit(ids("a"), GREEDY, StopRules(max_tokens=10), grammar=Grammar.choice(["bd"]))],
    )
    assert r.text == "bd" and r.finish_reason == "stop"


def test_the_fake_and_the_lockstep_leader_are_runners():
    fake = FakeRunner(CFG)
    assert isinstance(fake, Runner) and isinstance(LeaderRunner(fake), Runner)
    assert not hasattr(LeaderRunner, "__getattr__")  # nothing reaches the wrapped runner unlisted
