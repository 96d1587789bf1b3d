"""The real default model against golden data from Hugging Face transformers reading the same
GGUF (scripts/make_golden.py): prompts, logits and 32 greedy tokens for three chats."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import SamplingParams

GOLDEN = np.load(Path(__file__).parent / "data" / "smollm2_golden.npz")
MESSAGES = json.loads(str(GOLDEN["messages"]))


@nnx.jit
def full_logits(model, ids):
    h, _, _ = model.hidden(ids, jnp.arange(ids.shape[1])[None])
    return model.logits(h[0])


@pytest.mark.parametrize("i", range(len(MESSAGES)))
def test_chat_prompt_tokens_equal_reference(smollm2, i):
    assert smollm2.encode_chat(MESSAGES[i]) == GOLDEN[f"prompt_ids_{i}"].tolist()


@pytest.mark.parametrize("i", range(len(MESSAGES)))
def test_logits_match_reference(smollm2, i):
    """Teacher-forced over prompt + golden continuation: every step's top-16 logits agree."""
    prompt = GOLDEN[f"prompt_ids_{i}"].tolist()
    greedy = GOLDEN[f"greedy_{i}"].tolist()
    ids = jnp.asarray(prompt + greedy[:-1], jnp.int32)[None]
    logits = np.asarray(full_logits(smollm2.model, ids))
    np.testing.assert_allclose(logits[len(prompt) - 1], GOLDEN[f"last_logits_{i}"], atol=1e-3, rtol=0)
    steps = logits[len(prompt) - 1 :]
    top_ids, top_logits = GOLDEN[f"step_top_ids_{i}"], GOLDEN[f"step_top_logits_{i}"]
    got = np.take_along_axis(steps, top_ids, axis=-1)
    assert np.abs(got - top_logits).max() <= 1e-3


@pytest.mark.parametrize("i", range(len(MESSAGES)))
def test_greedy_tokens_match_reference(smollm2, i):
    prompt = GOLDEN[f"prompt_ids_{i}"].tolist()
    out = smollm2.generate([prompt], SamplingParams(temperature=0), max_tokens=32, ignore_eos=True)[0]
    assert out.token_ids == GOLDEN[f"greedy_{i}"].tolist()
    assert out.finish_reason == "length"


def test_france_question_answers_paris(smollm2):
    out = smollm2.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0)
    )
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
    assert out.usage.prompt_tokens == len(GOLDEN["prompt_ids_0"])
    assert out.usage.completion_tokens == len(out.token_ids) == 8  # 7 text tokens + <|im_end|>


def test_stream_concatenates_to_the_full_answer(smollm2):
    messages = [{"role": "user", "content": "Name three colors, with an emoji for each."}]
    sampling = SamplingParams(temperature=0)
    pieces = list(smollm2.chat_stream(messages, sampling, max_tokens=40))
    assert len(pieces) > 5
    assert "".join(pieces) == smollm2.chat(messages, sampling, max_tokens=40).text


def test_batch_generation_equals_single_runs(smollm2):
    prompts = [
        "Once upon a time",
        "The three primary colors are",
        "def fibonacci(n):",
        "Paris is",
        "1, 2, 3,",
    ]
    sampling = SamplingParams(temperature=0)
    together = smollm2.generate(prompts, sampling, max_tokens=16)  # 5 prompts over 4 slots: one waits
    for p, t in zip(prompts, together, strict=True):
        assert smollm2.generate(p, sampling, max_tokens=16)[0].token_ids == t.token_ids


def test_seeded_sampling_is_reproducible_and_seed_dependent(smollm2):
    messages = [{"role": "user", "content": "Tell me a short story."}]
    a = smollm2.chat(messages, SamplingParams(temperature=1.0, seed=7), max_tokens=24)
    b = smollm2.chat(messages, SamplingParams(temperature=1.0, seed=7), max_tokens=24)
    c = smollm2.chat(messages, SamplingParams(temperature=1.0, seed=8), max_tokens=24)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_embeddings_rank_similar_sentences_closer(smollm2):
    e = smollm2.embed(
        ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
    )
    assert e.shape == (3, smollm2.config.dim)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]


def test_second_chat_turn_prefills_only_the_new_message(smollm2):
    greedy = SamplingParams(temperature=0)
    history = [{"role": "user", "content": "What is the capital of France?"}]
    first = smollm2.chat(history, greedy, max_tokens=40)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    second = smollm2.chat(history, greedy, max_tokens=40)
    prompt2 = smollm2.encode_chat(history)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens + len(first.token_ids) - 2
    assert second.usage.cached_tokens < len(prompt2)
    assert "Rome" in second.text
