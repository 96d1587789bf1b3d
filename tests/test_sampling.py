"""On-device sampling: each filter keeps exactly the right tokens with the right probabilities,
including the slow (bisection) path, and seeds are per request."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.errors import InvalidRequestError
from llama_jax.sampling import CANDIDATES, FIELDS, SamplingParams, SlotSampling, sample

N = 20000


@jax.jit
def draws(logits, s, positions):
    """Tokens for row 0 of `logits` at each of `positions` (one draw per position)."""
    return jax.vmap(lambda p: sample(logits, s, p[None])[0][0])(positions)


def empirical(probs, params, n=N):
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    s = jax.tree.map(jnp.asarray, SlotSampling.from_params([params], [123]))
    toks = np.asarray(draws(logits, s, jnp.arange(n)))
    return np.bincount(toks, minlength=len(probs)) / n


def expected(probs, keep):
    p = np.where(keep, probs, 0.0)
    return p / p.sum()


PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


@pytest.mark.parametrize(
    "params,keep",
    [
        (SamplingParams(temperature=1.0), [1, 1, 1, 1, 1, 1]),
        (SamplingParams(temperature=1.0, top_k=2), [1, 1, 0, 0, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.7), [1, 1, 1, 0, 0, 0]),  # 0.4+0.25 < 0.7 <= 0.8
        (SamplingParams(temperature=1.0, top_p=0.65), [1, 1, 0, 0, 0, 0]),  # boundary: exactly reached
        (SamplingParams(temperature=1.0, min_p=0.3), [1, 1, 1, 0, 0, 0]),  # p >= 0.3 * 0.4
        (SamplingParams(temperature=1.0, min_p=0.2), [1, 1, 1, 1, 0, 0]),  # p >= 0.08
        # top-p over the renormalized top-3 (0.4, 0.25, 0.15)/0.8: 0.5, 0.8125 >= 0.8
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.8), [1, 1, 0, 0, 0, 0]),
    ],
)
def test_filters_keep_the_right_tokens_with_renormalized_probabilities(params, keep):
    got = empirical(PROBS, params)
    np.testing.assert_allclose(got, expected(PROBS, np.array(keep, bool)), atol=0.015)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        want = PROBS ** (1 / t)
        np.testing.assert_allclose(
            empirical(PROBS, SamplingParams(temperature=t)), want / want.sum(), atol=0.015
        )


def test_slow_path_beyond_the_candidate_window_is_exact():
    """A flat tail so that top_k and the nucleus reach past the first CANDIDATES tokens."""
    V = 4 * CANDIDATES
    probs = np.linspace(1.0, 0.5, V)  # distinct values: no ties at the thresholds
    probs[:8] = 20.0
    probs /= probs.sum()
    k = 2 * CANDIDATES
    got = empirical(probs, SamplingParams(temperature=1.0, top_k=k))
    assert got[k:].sum() == 0
    assert got[8:k].sum() == pytest.approx(probs[8:k].sum() / probs[:k].sum(), abs=0.02)
    order_mass = np.cumsum(probs)
    j = int(np.searchsorted(order_mass, 0.9))  # nucleus = tokens 0..j
    assert j > CANDIDATES
    got = empirical(probs, SamplingParams(temperature=1.0, top_p=0.9))
    assert got[j + 1 :].sum() == 0 and got[j - 8 : j + 1].sum() > 0


def test_greedy_is_argmax_and_logprob_is_raw_log_softmax(rng):
    logits = jnp.asarray(rng.standard_normal((3, 50)), jnp.float32)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, seed=1),
    ]
    s = jax.tree.map(jnp.asarray, SlotSampling.from_params(params, [0, 0, 1]))
    toks, lps = jax.jit(sample)(logits, s, jnp.arange(3))
    toks, lps = np.asarray(toks), np.asarray(lps)
    np.testing.assert_array_equal(toks[:2], np.argmax(np.asarray(logits[:2]), -1))
    ref = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(lps, ref[np.arange(3), toks], atol=1e-6)


def test_seeded_row_does_not_depend_on_its_neighbours(rng):
    logits = jnp.asarray(rng.standard_normal((4, 300)), jnp.float32)
    mine = SamplingParams(temperature=1.0, seed=42)
    other = [SamplingParams(temperature=t) for t in (0.3, 1.5, 0.0)]
    a = SlotSampling.from_params([mine, *other], [42, 1, 2, 3])
    b = SlotSampling.from_params([other[0], mine, other[1], other[2]], [9, 42, 8, 7])
    pos = jnp.full((4,), 17)
    ta, _ = jax.jit(sample)(logits, jax.tree.map(jnp.asarray, a), pos)
    tb, _ = jax.jit(sample)(logits[jnp.array([1, 0, 2, 3])], jax.tree.map(jnp.asarray, b), pos)
    assert int(ta[0]) == int(tb[1])


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.2}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"seed": 2**64}, "seed"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_invalid_values_are_rejected_with_the_parameter_named(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_each_field_is_defined_once_with_a_valid_default_and_a_range():
    assert list(FIELDS) == [f.name for f in dataclasses.fields(SamplingParams)]
    defaults = SamplingParams()
    for name, knob in FIELDS.items():
        assert knob.description and (knob.bounds() or knob.entries)
        assert getattr(defaults, name) == knob.default
    assert defaults.temperature == 0.7


@pytest.mark.parametrize("name", [n for n, k in FIELDS.items() if k.entries is None])
def test_each_field_takes_its_bounds_and_refuses_beyond_them(name):
    knob = FIELDS[name]
    step = 1 if knob.type is int else 1e-6
    for key, bound in knob.bounds().items():
        if key in ("ge", "le"):  # a closed bound is inside, one step past it is not
            SamplingParams(**{name: knob.type(bound)})
            beyond = bound - step if key == "ge" else bound + step
        else:  # an open bound is outside
            beyond = bound
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(**{name: knob.type(beyond)})
        assert e.value.param == name


def test_top_p_zero_keeps_only_the_most_likely_token():
    p = SamplingParams(temperature=1.3, top_p=0.0)
    assert (p.temperature, p.top_p) == (0.0, 1.0)


def reference_adjust(logits, params, history, start, end):
    """Plain numpy: bias, then OpenAI presence/frequency on generated tokens, then
    HF/llama.cpp repetition over the whole sequence."""
    x = logits.astype(np.float64).copy()
    for tok, b in params.logit_bias.items():
        if tok < len(x):
            x[tok] += b
    gen = history[start:end]
    for tok in set(gen.tolist()):
        x[tok] -= params.presence_penalty + params.frequency_penalty * int((gen == tok).sum())
    for tok in set(history[:end].tolist()):
        x[tok] = x[tok] / params.repetition_penalty if x[tok] > 0 else x[tok] * params.repetition_penalty
    return x


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(presence_penalty=1.5),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=-0.5, frequency_penalty=2.0, repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.8, logit_bias={3: 5.0, 7: -100.0, 10**6: 1.0}),
        SamplingParams(),
    ],
)
def test_penalties_and_bias_match_a_numpy_reference(rng, params):
    from llama_jax.sampling import adjust_logits

    V, S = 40, 16
    logits = rng.standard_normal((2, V)).astype(np.float32) * 3
    history = rng.integers(0, 12, (2, S)).astype(np.int32)  # repeats, so counts exceed 1
    start, end = np.array([5, 2], np.int32), np.array([12, 16], np.int32)
    s = jax.tree.map(jnp.asarray, SlotSampling.from_params([params, params], [0, 1]))
    got = np.asarray(jax.jit(adjust_logits)(jnp.asarray(logits), s, jnp.asarray(history), start, end))
    for b in range(2):
        np.testing.assert_allclose(
            got[b], reference_adjust(logits[b], params, history[b], start[b], end[b]), atol=1e-4
        )


def test_a_large_negative_bias_bans_a_token_and_a_positive_one_forces_it():
    probs = np.array([0.5, 0.3, 0.2])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    from llama_jax.sampling import adjust_logits

    s = jax.tree.map(
        jnp.asarray, SlotSampling.from_params([SamplingParams(temperature=0, logit_bias={2: 100.0})], [0])
    )
    adjusted = adjust_logits(
        logits, s, jnp.zeros((1, 4), jnp.int32), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32)
    )
    assert int(sample(adjusted, s, jnp.zeros(1, jnp.int32))[0][0]) == 2
    ban = jax.tree.map(jnp.asarray, SlotSampling.from_params([SamplingParams(logit_bias={0: -100.0})], [0]))
    banned = adjust_logits(
        logits, ban, jnp.zeros((1, 4), jnp.int32), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32)
    )
    assert float(jax.nn.softmax(banned)[0, 0]) < 1e-40


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
    ],
)
def test_invalid_penalties_and_bias_are_rejected(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
