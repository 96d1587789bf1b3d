"""The scheduler on a tiny random model: continuous batching, limits, stops, cancellation, and no
compilation in steady state."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import gguf_metadata, random_tensors, tiny_config

from llama_jax.constrain import Grammar
from llama_jax.errors import ContextLengthError, InvalidRequestError, OverloadedError
from llama_jax.runner import ModelRunner
from llama_jax.sampling import SamplingParams
from llama_jax.scheduler import Scheduler
from llama_jax.stopping import StopRules
from llama_jax.tokenizer import Tokenizer
from llama_jax.weights import build_model, pack_tensors
from llama_jax.xla_cache import CompileCounter

GREEDY = SamplingParams(temperature=0), StopRules(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config()
    model = build_model(cfg, pack_tensors(cfg, random_tensors(cfg).items(), "tiny"))
    tokenizer = Tokenizer.from_gguf_metadata(gguf_metadata(cfg), "tiny")
    runner = ModelRunner(model, max_slots=3, max_seq_len=128, max_prefill_chunk=32)
    return runner, tokenizer


@pytest.fixture
def scheduler(parts):
    runner, tokenizer = parts
    return Scheduler(runner, tokenizer, eos_ids=(2,), max_queue=8)


def run(scheduler, reqs, max_steps=2000):
    for _ in range(max_steps):
        if all(r.finished for r in reqs):
            return reqs
        scheduler.step()
    raise AssertionError("requests did not finish")


def prompt(rng, n):
    return rng.integers(3, 250, n).tolist()


def test_more_requests_than_slots_all_finish_with_the_same_tokens_as_alone(scheduler, rng):
    prompts = [prompt(rng, n) for n in (5, 40, 9, 70, 3, 17, 33)]  # 40 and 70 need chunked prefill
    reqs = run(scheduler, [scheduler.submit(p, *GREEDY) for p in prompts])
    for p, r in zip(prompts, reqs, strict=True):
        assert r.finish_reason == "length" and len(r.output_ids) == 12
        (alone,) = run(scheduler, [scheduler.submit(p, *GREEDY)])
        assert alone.output_ids == r.output_ids
    assert scheduler.live_slots == 0


def test_deltas_add_up_to_the_text_and_carry_every_token(scheduler, rng):
    (r,) = run(
        scheduler,
        [scheduler.submit(prompt(rng, 8), SamplingParams(temperature=0.9, seed=3), StopRules(max_tokens=20))],
    )
    deltas = list(r.deltas)
    assert "".join(d.text for d in deltas) == r.text
    assert [t for d in deltas for t in d.token_ids] == r.output_ids
    assert [d.finish_reason for d in deltas].count(None) == len(deltas) - 1
    assert deltas[-1].finish_reason == r.finish_reason


def test_stop_string_ends_generation_and_is_excluded(scheduler, rng):
    p = prompt(rng, 6)
    (free,) = run(
        scheduler,
        [scheduler.submit(p, SamplingParams(temperature=0), StopRules(max_tokens=30, ignore_eos=True))],
    )
    assert len(free.text) > 6
    stop = free.text[3:5]
    (r,) = run(
        scheduler,
        [
            scheduler.submit(
                p, SamplingParams(temperature=0), StopRules(max_tokens=30, ignore_eos=True, stop=[stop])
            )
        ],
    )
    assert r.finish_reason == "stop"
    assert r.text == free.text[: free.text.index(stop)]


def test_stop_token_and_eos(scheduler, rng):
    p = prompt(rng, 6)
    (free,) = run(scheduler, [scheduler.submit(p, *GREEDY)])
    target = free.output_ids[4]
    (r,) = run(
        scheduler,
        [
            scheduler.submit(
                p, SamplingParams(temperature=0), StopRules(max_tokens=12, stop_token_ids=[target])
            )
        ],
    )
    assert r.finish_reason == "stop" and r.output_ids == free.output_ids[: free.output_ids.index(target) + 1]
    scheduler.eos_ids = frozenset({target})
    (r,) = run(scheduler, [scheduler.submit(p, SamplingParams(temperature=0), StopRules(max_tokens=12))])
    assert r.finish_reason == "stop" and r.output_ids[-1] == target
    (r,) = run(scheduler, [scheduler.submit(p, *GREEDY)])  # ignore_eos
    assert r.output_ids == free.output_ids


def test_context_length_and_bad_prompts_fail_before_any_device_work(scheduler):
    with pytest.raises(ContextLengthError, match="maximum context length is 128"):
        scheduler.submit(list(range(3, 103)), SamplingParams(), StopRules(max_tokens=29))
    scheduler.submit(list(range(3, 103)), SamplingParams(), StopRules(max_tokens=28))  # exactly fits
    with pytest.raises(InvalidRequestError):
        scheduler.submit([], SamplingParams(), StopRules())
    with pytest.raises(InvalidRequestError):
        scheduler.submit([5, 10**6], SamplingParams(), StopRules())


def test_full_queue_raises_overloaded(scheduler):
    for _ in range(8):
        scheduler.submit([5, 6, 7], SamplingParams(), StopRules(max_tokens=4))
    with pytest.raises(OverloadedError):
        scheduler.submit([5, 6, 7], SamplingParams(), StopRules(max_tokens=4))


def test_cancel_frees_the_slot_and_service_continues(scheduler, rng):
    long = [
        scheduler.submit(prompt(rng, 10), SamplingParams(), StopRules(max_tokens=100, ignore_eos=True))
        for _ in range(3)
    ]
    for _ in range(5):
        scheduler.step()
    assert scheduler.live_slots == 3
    for r in long:
        scheduler.cancel(r)
    assert scheduler.live_slots == 0 and all(r.finish_reason == "cancelled" for r in long)
    (r,) = run(scheduler, [scheduler.submit(prompt(rng, 4), *GREEDY)])
    assert len(r.output_ids) == 12


def test_steady_state_has_no_compiles(scheduler, rng):
    scheduler.warmup()
    requests = []
    for i in range(30):
        v = dict(
            temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
            top_p=float(rng.uniform(0.1, 1.0)),
            top_k=int(rng.choice([0, 1, 5, 200])),
            min_p=float(rng.choice([0.0, 0.1])),
            seed=int(rng.integers(0, 2**40)),
            max_tokens=int(rng.integers(1, 20)),
            stop=["ab"] if i % 3 == 0 else (),
            top_logprobs=int(rng.choice([0, 0, 3, 20])),
            presence_penalty=float(rng.choice([0.0, 0.5])),
            repetition_penalty=float(rng.choice([1.0, 1.2])),
            logit_bias={int(rng.integers(3, 250)): 5.0} if i % 4 == 0 else {},
            ignore_eos=bool(i % 2),
        )
        rules = StopRules(**{k: v.pop(k) for k in ("max_tokens", "stop", "ignore_eos")})
        grammar = [None, Grammar.regex("[a-z ]{1,30}"), Grammar.json_object()][i % 3 if i % 2 else 0]
        requests.append((SamplingParams(**v), rules, grammar))
    with CompileCounter() as c:
        done = []
        for lo in range(0, len(requests), 8):  # the queue holds 8
            batch = []
            for params, rules, grammar in requests[lo : lo + 8]:
                if done and rng.random() < 0.5:  # a follow-up turn: reuses a prefix, starts anywhere
                    prev = done[int(rng.integers(len(done)))]
                    ids = (prev.prompt_ids + prev.output_ids)[:90] + prompt(rng, int(rng.integers(1, 9)))
                else:
                    ids = prompt(rng, int(rng.integers(1, 100)))
                batch.append(scheduler.submit(ids, params, rules, grammar=grammar))
            done += run(scheduler, batch)
        params, rules, grammar = requests[0]
        group = scheduler.make_group(prompt(rng, 40), params, rules, 3, grammar=grammar)
        for r in group:
            scheduler.enqueue(r)
        run(scheduler, group)
    assert any(r.cached_tokens for r in done)
    assert c.traces == 0 and c.compiles == 0


def test_compile_counter_sees_a_new_compile():
    import jax

    with CompileCounter() as c:
        jax.jit(lambda x: x * 3 + 1)(np.zeros(7, np.float32))
    assert c.traces >= 1


def test_second_turn_reuses_the_first_turns_cache(scheduler, parts, rng):
    turn1 = prompt(rng, 40)
    (a,) = run(scheduler, [scheduler.submit(turn1, *GREEDY)])
    assert a.cached_tokens == 0
    turn2 = turn1 + a.output_ids + prompt(rng, 10)
    (b,) = run(scheduler, [scheduler.submit(turn2, *GREEDY)])
    # Everything written by turn 1 (its prompt and all but its last, never-decoded token).
    assert b.cached_tokens == len(turn1) + len(a.output_ids) - 1
    assert b.deltas[-1].usage.cached_tokens == b.cached_tokens
    runner, tokenizer = parts
    fresh = Scheduler(runner, tokenizer, prefix_cache=False)
    (c,) = run(fresh, [fresh.submit(turn2, *GREEDY)])
    assert c.cached_tokens == 0 and c.output_ids == b.output_ids


def test_repeated_prompt_prefills_only_its_last_token(scheduler, rng):
    p = prompt(rng, 25)
    (a,) = run(scheduler, [scheduler.submit(p, *GREEDY)])
    (b,) = run(scheduler, [scheduler.submit(p, *GREEDY)])
    assert b.cached_tokens == len(p) - 1 and b.output_ids == a.output_ids
    assert scheduler.metrics.prefix_cache_hits >= 1


def test_a_different_prompt_does_not_reuse_a_stale_cache(scheduler, rng):
    p = prompt(rng, 20)
    run(scheduler, [scheduler.submit(p, *GREEDY)])
    other = [p[0] + 1 if p[0] < 250 else 3] + p[1:]
    (b,) = run(scheduler, [scheduler.submit(other, *GREEDY)])
    assert b.cached_tokens == 0


def test_metrics_count_what_happened(scheduler, rng):
    p = prompt(rng, 10)
    reqs = run(
        scheduler,
        [
            scheduler.submit(p, *GREEDY),
            scheduler.submit(prompt(rng, 7), SamplingParams(), StopRules(max_tokens=3, ignore_eos=True)),
        ],
    )
    (again,) = run(scheduler, [scheduler.submit(p, *GREEDY)])
    m = scheduler.metrics
    assert m.requests_submitted == 3 and m.requests_finished == {"length": 3}
    assert m.prompt_tokens == 10 + 7 + 10 and m.cached_prompt_tokens == again.cached_tokens == 9
    assert m.generated_tokens == 12 + 3 + 12 == sum(len(r.output_ids) for r in [*reqs, again])
    assert m.ttft.n == 3 and m.itl.n == 11 + 2 + 11
    assert scheduler.gauges() == {"queue_length": 0, "live_slots": 0, "max_slots": 3, "kv_cache_usage": 0.0}
    snap = m.snapshot()
    assert sum(snap["ttft"]["counts"]) == 3 and snap["prefix_cache_hits"] == 1


def test_top_logprobs_are_the_most_likely_tokens_in_order(scheduler, parts, rng):
    p = prompt(rng, 9)
    (r,) = run(
        scheduler,
        [
            scheduler.submit(
                p, SamplingParams(temperature=0, top_logprobs=5), StopRules(max_tokens=6, ignore_eos=True)
            )
        ],
    )
    (plain,) = run(scheduler, [scheduler.submit(p, *GREEDY)])
    tokens = [d for d in r.deltas if d.token_ids]
    assert all(len(d.top_logprobs) == 1 and len(d.top_logprobs[0]) == 5 for d in tokens)
    assert all(d.top_logprobs == () for d in plain.deltas)
    runner, _ = parts
    import jax
    import jax.numpy as jnp

    model = runner._model(runner._leaves)
    ids = jnp.asarray([p + r.output_ids[:-1]], jnp.int32)
    h, _, _ = model.hidden(ids, jnp.arange(ids.shape[1])[None])
    ref = np.asarray(jax.nn.log_softmax(model.logits(h[0]), -1))[len(p) - 1 :]
    for i, d in enumerate(tokens):
        top = d.top_logprobs[0]
        assert [t for t, _ in top] == np.argsort(-ref[i])[:5].tolist()
        np.testing.assert_allclose([lp for _, lp in top], np.sort(ref[i])[::-1][:5], atol=1e-4)
        assert top[0][0] == d.token_ids[0] and top[0][1] == pytest.approx(d.logprobs[0], abs=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, repetition_penalty=1.8),
        SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=1.0),
    ],
)
def test_penalties_see_the_prompt_and_every_generated_token(scheduler, parts, rng, params):
    """Each greedy token equals argmax of a numpy-penalized full forward pass over the
    sequence so far: the device-side token history is right in prefill and decode."""
    import jax.numpy as jnp
    from test_sampling import reference_adjust

    p = rng.integers(3, 30, 12).tolist()  # a small alphabet: the prompt repeats itself
    (r,) = run(scheduler, [scheduler.submit(p, params, StopRules(max_tokens=6, ignore_eos=True))])
    runner, _ = parts
    model = runner._model(runner._leaves)
    seq = p + r.output_ids
    h, _, _ = model.hidden(jnp.asarray([seq[:-1]], jnp.int32), jnp.arange(len(seq) - 1)[None])
    logits = np.asarray(model.logits(h[0]))
    for i, tok in enumerate(r.output_ids):
        end = len(p) + i
        want = reference_adjust(logits[end - 1], params, np.asarray(seq), len(p), end)
        assert tok == int(np.argmax(want)), f"token {i}"


def test_logit_bias_bans_a_token_through_the_engine(scheduler, rng):
    p = prompt(rng, 8)
    (free,) = run(scheduler, [scheduler.submit(p, *GREEDY)])
    banned = free.output_ids[0]
    (r,) = run(
        scheduler,
        [
            scheduler.submit(
                p,
                SamplingParams(temperature=0, logit_bias={banned: -100.0}),
                StopRules(max_tokens=12, ignore_eos=True),
            )
        ],
    )
    assert banned not in r.output_ids


def test_n_samples_share_one_prefill_and_match_separate_requests(scheduler, parts, rng):
    p = prompt(rng, 50)  # two chunks for the leader; the others copy its cache
    params = SamplingParams(temperature=1.0, seed=11), StopRules(max_tokens=8, ignore_eos=True)
    group = scheduler.make_group(p, *params, 3)
    for r in group:
        scheduler.enqueue(r)
    run(scheduler, group)
    assert [r.cached_tokens for r in group] == [0, len(p) - 1, len(p) - 1]
    assert len({tuple(r.output_ids) for r in group}) == 3  # different seeds, different samples
    runner, tokenizer = parts
    for i, r in enumerate(group):  # each equals a lone request with its seed, prefilled in full
        fresh = Scheduler(runner, tokenizer, prefix_cache=False)
        (alone,) = run(
            fresh,
            [
                fresh.submit(
                    p, SamplingParams(temperature=1.0, seed=11 + i), StopRules(max_tokens=8, ignore_eos=True)
                )
            ],
        )
        assert alone.output_ids == r.output_ids


def test_a_group_larger_than_the_slots_still_completes(scheduler, rng):
    group = scheduler.make_group(prompt(rng, 20), *GREEDY, 5)  # 3 slots
    for r in group:
        scheduler.enqueue(r)
    run(scheduler, group)
    assert all(r.finish_reason == "length" for r in group)
    assert len({tuple(r.output_ids) for r in group}) == 1  # greedy: identical samples


def test_prefill_budget_keeps_streams_flowing_and_serves_the_oldest_first(scheduler, rng):
    """Budget = one 32-token chunk per step: a running stream gains a token every step while
    two 70-token prompts are admitted, and the older prompt gets its first token first."""
    a = scheduler.submit(
        prompt(rng, 5), SamplingParams(temperature=0), StopRules(max_tokens=40, ignore_eos=True)
    )
    while len(a.output_ids) < 2:
        scheduler.step()
    b = scheduler.submit(prompt(rng, 70), *GREEDY)
    c = scheduler.submit(prompt(rng, 70), *GREEDY)
    first = {}
    for step in range(12):
        before = len(a.output_ids)
        scheduler.step()
        assert len(a.output_ids) == before + 1, f"stream stalled at step {step}"
        for name, r in (("b", b), ("c", c)):
            if r.output_ids and name not in first:
                first[name] = step
    assert first["b"] < first["c"]
    assert first["c"] - first["b"] >= 2  # c's three chunks waited for b's


def test_tokens_reach_callers_mid_step_as_soon_as_they_exist(scheduler, rng, monkeypatch):
    """With prefills in a step, the previous decode step's token is handed out before the host
    waits on the first prefill, and each prompt's first token right after its own prefill."""
    a = scheduler.submit(
        prompt(rng, 5), SamplingParams(temperature=0), StopRules(max_tokens=40, ignore_eos=True)
    )
    while len(a.output_ids) < 2:
        scheduler.step()
    b = scheduler.submit(prompt(rng, 6), *GREEDY)
    c = scheduler.submit(prompt(rng, 7), *GREEDY)
    events = []
    prefill = scheduler.runner.prefill

    def recording_prefill(state, chunk, slot, *args):
        events.append(("prefill", len(chunk)))
        return prefill(state, chunk, slot, *args)

    monkeypatch.setattr(scheduler.runner, "prefill", recording_prefill)
    scheduler.deliver = lambda: events.append(
        ("deliver", len(a.output_ids), len(b.output_ids), len(c.output_ids))
    )
    n = len(a.output_ids)
    scheduler.step()
    assert events == [
        ("prefill", 6),
        ("deliver", n + 1, 0, 0),  # a's token from the previous step, before b's prefill is waited on
        ("deliver", n + 1, 1, 0),  # b's first token, before c's prefill
        ("prefill", 7),
        ("deliver", n + 1, 1, 1),
    ]
    scheduler.deliver = None
    run(scheduler, [a, b, c])
    assert [len(r.output_ids) for r in (a, b, c)] == [40, 12, 12]


def test_requests_sharing_a_prefix_prefill_it_once(scheduler, parts, rng, monkeypatch):
    """A burst with one 30-token "system prompt" and different questions: the first request
    prefills it, the others copy it from that slot and prefill only their own tokens, and
    every answer equals the same request alone on an scheduler without any prefix reuse."""
    system = prompt(rng, 30)
    prompts = [system + prompt(rng, 5) for _ in range(3)]
    prefilled = []
    prefill = scheduler.runner.prefill

    def counting_prefill(state, chunk, *args):
        prefilled.append(len(chunk))
        return prefill(state, chunk, *args)

    monkeypatch.setattr(scheduler.runner, "prefill", counting_prefill)
    reqs = run(scheduler, [scheduler.submit(p, *GREEDY) for p in prompts])
    assert [r.cached_tokens for r in reqs] == [0, 30, 30]
    assert sum(prefilled) == 35 + 5 + 5
    assert reqs[1].deltas[-1].usage.cached_tokens == 30
    assert scheduler.metrics.prefix_cache_hits == 2 and scheduler.metrics.cached_prompt_tokens == 60
    monkeypatch.undo()
    runner, tokenizer = parts
    for p, r in zip(prompts, reqs, strict=True):
        fresh = Scheduler(runner, tokenizer, prefix_cache=False)
        (alone,) = run(fresh, [fresh.submit(p, *GREEDY)])
        assert alone.output_ids == r.output_ids


def test_a_request_whose_prefix_source_is_cancelled_prefills_it_itself(scheduler, parts, rng):
    """The source of a shared prefix goes away before it has prefilled that prefix: the
    request prefills everything itself, with the same answer."""
    p = prompt(rng, 70)  # three 32-token chunks
    a = scheduler.submit(p, *GREEDY)
    b = scheduler.submit(p[:60] + prompt(rng, 4), *GREEDY)
    scheduler.step()  # a's first chunk only (the budget is one chunk)
    assert b.shared is not None and a.prefilled == 32
    scheduler.cancel(a)
    run(scheduler, [b])
    assert b.cached_tokens == 0 and b.finish_reason == "length"
    runner, tokenizer = parts
    fresh = Scheduler(runner, tokenizer, prefix_cache=False)
    (alone,) = run(fresh, [fresh.submit(b.prompt_ids, *GREEDY)])
    assert alone.output_ids == b.output_ids


def test_one_client_holds_at_most_its_share_of_the_queue(parts, rng):
    runner, tokenizer = parts
    scheduler = Scheduler(runner, tokenizer, eos_ids=(2,), max_queue=8)  # a share of 8 // 4 = 2
    params = SamplingParams(temperature=0), StopRules(max_tokens=4, ignore_eos=True)
    first = [scheduler.submit(prompt(rng, 5), *params, client="a") for _ in range(2)]
    with pytest.raises(OverloadedError, match="per client"):
        scheduler.submit(prompt(rng, 5), *params, client="a")
    other = scheduler.submit(prompt(rng, 5), *params, client="b")  # another client still gets in
    scheduler.step()  # admitted to slots: no longer waiting, so "a" has room again
    late = scheduler.submit(prompt(rng, 5), *params, client="a")
    run(scheduler, [*first, other, late])
    assert not scheduler.queued_by_client  # nothing counted once nothing waits


def test_embeddings_run_a_bounded_chunk_per_step_between_decode_steps(parts, rng):
    runner, tokenizer = parts
    scheduler = Scheduler(runner, tokenizer, eos_ids=(2,), embed_budget=64)
    rows = [prompt(rng, int(n)) for n in rng.integers(5, 32, 30)]
    stream = scheduler.submit(prompt(rng, 8), *GREEDY)
    job = scheduler.make_embedding(rows)
    scheduler.enqueue_embedding(job)
    done, tokens = [0], [0]
    while not job.finished:
        scheduler.step()
        chunk = sorted(map(len, rows))[done[-1] : job.done]
        assert len(chunk) <= 1 or len(chunk) * max(chunk) <= 64  # a bounded chunk per step
        done.append(job.done)
        tokens.append(len(stream.output_ids))
    assert len(done) > 5  # many steps, not one long call ...
    assert stream.finished or tokens[-1] > 0  # ... and the stream decoded meanwhile
    np.testing.assert_allclose(job.out, runner.embed(rows), rtol=1e-5, atol=1e-6)
    run(scheduler, [stream])


def test_a_cancelled_embedding_stops_after_its_current_chunk(parts, rng):
    runner, tokenizer = parts
    scheduler = Scheduler(runner, tokenizer, eos_ids=(2,), embed_budget=32)
    job = scheduler.make_embedding([prompt(rng, 30) for _ in range(10)])
    scheduler.enqueue_embedding(job)
    scheduler.step()
    assert job.done == 1
    scheduler.cancel_embedding(job)
    assert job.finished and not scheduler.has_work
    scheduler.step()
    assert job.done == 1
