"""Model math and the jitted steps on a tiny random model: the cache path equals a full
forward pass, chunked prefill equals one-shot prefill, a batch equals separate runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.model import attend
from llama_jax.runner import ModelRunner, unpack
from llama_jax.sampling import SamplingParams, SlotSampling

GREEDY = SlotSampling.from_params([SamplingParams(temperature=0)], [0])


def full_logprobs(model, ids):
    """log-softmax over the vocabulary at every position of one full forward pass [T, V]."""
    ids = jnp.asarray(ids, jnp.int32)[None]
    h, _, _ = model.hidden(ids, jnp.arange(ids.shape[1])[None])
    return np.asarray(jax.nn.log_softmax(model.logits(h[0]), -1))


def greedy_run(runner, prompts, steps, slots=None):
    """Greedy tokens and logprobs for each prompt, decoded together in the given slots."""
    state = runner.init_state()
    slots = slots or list(range(len(prompts)))
    toks = {s: [] for s in slots}
    lps = {s: [] for s in slots}
    for s, p in zip(slots, prompts, strict=True):
        start = 0
        while start < len(p):
            chunk = p[start : start + runner.max_prefill_chunk]
            state, out = runner.prefill(state, np.asarray(chunk, np.int32), s, start, GREEDY)
            start += len(chunk)
        t, lp = unpack(out)
        toks[s].append(int(t[0]))
        lps[s].append(float(lp[0]))
    active = np.zeros(runner.max_slots, bool)
    active[slots] = True
    for i in range(steps - 1):
        longest = max(len(p) for p in prompts) + i + 1
        state, out = runner.decode(state, active, longest)
        t, lp = unpack(out)
        for s in slots:
            toks[s].append(int(t[s]))
            lps[s].append(float(lp[s]))
    return [toks[s] for s in slots], [lps[s] for s in slots]


def test_grouped_attention_equals_attention_with_repeated_kv(rng):
    B, T, K, G, H, C = 2, 5, 2, 3, 8, 7
    q = rng.standard_normal((B, T, K, G, H)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((B, T, K, H)).astype(np.float32) for _ in range(2))
    k_ctx, v_ctx = (rng.standard_normal((B, C, K, H)).astype(np.float32) for _ in range(2))
    ctx_len = np.array([3, 7], np.int32)
    got = np.asarray(attend(q, k_new, v_new, k_ctx, v_ctx, ctx_len))
    # Reference: heads n = k*G + g, K/V repeated per query head, explicit masks, loops over batch.
    for b in range(B):
        keys = np.concatenate([k_ctx[b, : ctx_len[b]], k_new[b]])  # [S, K, H]
        vals = np.concatenate([v_ctx[b, : ctx_len[b]], v_new[b]])
        keys = np.repeat(keys, G, axis=1)  # [S, N, H]
        vals = np.repeat(vals, G, axis=1)
        qb = q[b].reshape(T, K * G, H)
        s = np.einsum("tnh,snh->nts", qb, keys) / np.sqrt(H)
        causal = np.arange(T)[:, None] + ctx_len[b] >= np.arange(len(keys))[None, :]
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want = np.einsum("nts,snh->tnh", p, vals).reshape(T, K, G, H)
        np.testing.assert_allclose(got[b], want, atol=1e-5)


def test_cached_decode_equals_full_forward(tiny_model, rng):
    runner = ModelRunner(tiny_model, max_slots=2, max_seq_len=64)
    prompt = rng.integers(3, tiny_model.cfg.vocab_size, 11).tolist()
    (toks,), (lps,) = greedy_run(runner, [prompt], steps=20)
    ref = full_logprobs(tiny_model, prompt + toks[:-1])
    for i, (t, lp) in enumerate(zip(toks, lps, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert t == int(np.argmax(row)), f"step {i}"
        assert lp == pytest.approx(float(row[t]), abs=1e-4)
    assert len(set(toks)) > 2, "the tiny model should not be degenerate"


def test_chunked_prefill_equals_one_shot(tiny_model, rng):
    prompt = rng.integers(3, tiny_model.cfg.vocab_size, 45).tolist()
    one = ModelRunner(tiny_model, max_slots=1, max_seq_len=128, max_prefill_chunk=64)
    chunked = ModelRunner(
        tiny_model, max_slots=1, max_seq_len=128, max_prefill_chunk=16, min_context_bucket=16
    )
    a, la = greedy_run(one, [prompt], steps=8)
    b, lb = greedy_run(chunked, [prompt], steps=8)
    assert a == b
    np.testing.assert_allclose(la, lb, atol=1e-4)


def test_batch_equals_separate_runs(tiny_model, rng):
    runner = ModelRunner(tiny_model, max_slots=4, max_seq_len=64)
    prompts = [rng.integers(3, tiny_model.cfg.vocab_size, n).tolist() for n in (3, 17, 9)]
    together, lp_together = greedy_run(runner, prompts, steps=12, slots=[2, 0, 3])
    for p, t, lp in zip(prompts, together, lp_together, strict=True):
        alone, lp_alone = greedy_run(runner, [p], steps=12, slots=[1])
        assert alone[0] == t
        np.testing.assert_allclose(lp_alone[0], lp, atol=1e-4)


def test_embeddings_are_normalized_and_ignore_padding(tiny_model, rng):
    runner = ModelRunner(tiny_model, max_slots=1, max_seq_len=64)
    rows = [rng.integers(3, 90, n).tolist() for n in (5, 12, 1)]
    batch = runner.embed(rows)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    for i, r in enumerate(rows):  # alone (different padding) gives the same vector
        np.testing.assert_allclose(runner.embed([r])[0], batch[i], atol=1e-5)
    assert not np.allclose(batch[0], batch[1])
