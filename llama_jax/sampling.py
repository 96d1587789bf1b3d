"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p, min-p, seeds.

`SamplingParams` is the user-facing, validated description of one request's sampling.
`SlotSampling` holds the same values as per-slot device arrays `[B]`, so changing them never
recompiles. `sample()` is exact (no candidate truncation) yet avoids a full sort of the
vocabulary, which costs ~25 ms per row on XLA:CPU:

1. the top-k and nucleus thresholds come from `lax.top_k` over `CANDIDATES` logits, falling
   back (under `lax.cond`, only when some row needs it) to a bisection over the whole row;
2. the kept distribution is sampled by a two-level inverse CDF (blocks of 256 tokens, then
   one block) from two uniforms per row, instead of V Gumbel draws.

Randomness: each slot's key is folded with the position being generated, so a request with
a seed gets the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.errors import InvalidRequestError

if TYPE_CHECKING:
    from llama_jax.constrain import Grammar

CANDIDATES = 64  # logits examined for top-k / top-p before falling back to bisection
BLOCK = 256  # tokens per block in the two-level inverse-CDF draw
_BISECT_STEPS = 32
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 300  # entries of logit_bias per request
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf: OpenAI-style servers report this instead


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. `temperature=0` is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    max_tokens: int = 256
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0  # alternatives reported per token, 0..20
    presence_penalty: float = 0.0  # OpenAI: subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated text
    repetition_penalty: float = 1.0  # HF/llama.cpp: divides (or multiplies) logits of prompt+output tokens
    logit_bias: Mapping[int, float] = dataclasses.field(default_factory=dict)  # token id -> added bias
    grammar: Grammar | None = None  # constrained decoding: what the output must match

    def __post_init__(self):
        def bad(param, msg):
            raise InvalidRequestError(f"{param} {msg}", param=param)

        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be between 0 and 100, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < 2**31:
            bad("top_k", f"must be between 0 and 2**31 - 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.max_tokens < 1:
            bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, f"must be between -2 and 2, got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
        for tok, bias in self.logit_bias.items():
            if not isinstance(tok, int) or tok < 0:
                bad("logit_bias", f"keys must be token ids (non-negative integers), got {tok!r}")
            if not -100.0 <= bias <= 100.0:
                bad("logit_bias", f"values must be between -100 and 100, got {bias}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad("seed", "must fit in 64 bits")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotSampling:
    """Per-slot sampling values as device arrays, all `[B]` (keys `[B, 2]` uint32)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    key: jax.Array
    top_logprobs: jax.Array
    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS], unused entries hold a huge id (dropped)
    bias_values: jax.Array  # [B, MAX_LOGIT_BIAS]

    @classmethod
    def zeros(cls, batch: int) -> SlotSampling:
        return cls(
            temperature=jnp.zeros((batch,), jnp.float32),
            top_k=jnp.zeros((batch,), jnp.int32),
            top_p=jnp.ones((batch,), jnp.float32),
            min_p=jnp.zeros((batch,), jnp.float32),
            key=jnp.zeros((batch, 2), jnp.uint32),
            top_logprobs=jnp.zeros((batch,), jnp.int32),
            presence=jnp.zeros((batch,), jnp.float32),
            frequency=jnp.zeros((batch,), jnp.float32),
            repetition=jnp.ones((batch,), jnp.float32),
            bias_ids=jnp.full((batch, MAX_LOGIT_BIAS), _NO_TOKEN, jnp.int32),
            bias_values=jnp.zeros((batch, MAX_LOGIT_BIAS), jnp.float32),
        )

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int]) -> SlotSampling:
        """Host-side numpy rows (one per request) ready to be inserted into a slot."""
        return cls(
            temperature=np.asarray([p.temperature for p in params], np.float32),
            top_k=np.asarray([p.top_k for p in params], np.int32),
            top_p=np.asarray([p.top_p for p in params], np.float32),
            min_p=np.asarray([p.min_p for p in params], np.float32),
            key=np.stack([seed_key(s) for s in seeds]),
            top_logprobs=np.asarray([p.top_logprobs for p in params], np.int32),
            presence=np.asarray([p.presence_penalty for p in params], np.float32),
            frequency=np.asarray([p.frequency_penalty for p in params], np.float32),
            repetition=np.asarray([p.repetition_penalty for p in params], np.float32),
            bias_ids=np.asarray([_padded(list(p.logit_bias), _NO_TOKEN) for p in params], np.int32),
            bias_values=np.asarray([_padded(list(p.logit_bias.values()), 0.0) for p in params], np.float32),
        )


_NO_TOKEN = 2**30  # an id past any vocabulary: scatters drop it


def _padded(values: list, fill) -> list:
    return values + [fill] * (MAX_LOGIT_BIAS - len(values))


def adjust_logits(
    logits: jax.Array, s: SlotSampling, history: jax.Array, start: jax.Array, end: jax.Array
) -> jax.Array:
    """Logit bias and penalties, before sampling (skipped by `lax.cond` when no row uses them).

    history [B, S]: token ids by position; positions [0, end) are the sequence so far, of which
    [start, end) were generated. presence/frequency count generated tokens (OpenAI);
    repetition covers prompt and output (HF, llama.cpp): positive logits are divided by it,
    negative ones multiplied. Bias ids outside the vocabulary are ignored.
    """
    B, V = logits.shape
    rows = jnp.arange(B)[:, None]
    biased = logits.at[rows, s.bias_ids].add(s.bias_values, mode="drop")
    logits = jax.lax.cond(jnp.any(s.bias_values != 0), lambda: biased, lambda: logits)

    def penalize():
        pos = jnp.arange(history.shape[1])[None, :]
        in_seq = pos < end[:, None]
        generated = in_seq & (pos >= start[:, None])
        counts = (
            jnp.zeros((B, V), jnp.float32).at[rows, history].add(generated.astype(jnp.float32), mode="drop")
        )
        seen = jnp.zeros((B, V), bool).at[rows, history].max(in_seq, mode="drop")
        x = logits - s.presence[:, None] * (counts > 0) - s.frequency[:, None] * counts
        rep = s.repetition[:, None]
        return jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)

    on = (s.presence != 0) | (s.frequency != 0) | (s.repetition != 1)
    return jax.lax.cond(jnp.any(on), penalize, lambda: logits)


MASK_BITS = 32  # tokens per word of an allowed-token bitmask
_MASKED = -1e30  # finite, so the top-p bisection and logsumexp stay well defined


def mask_words(vocab: int) -> int:
    """Words of an allowed-token bitmask for a vocabulary of `vocab` tokens."""
    return -(-vocab // MASK_BITS)


def apply_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Constrained decoding: mask [B, W] int32 has bit t % 32 of word t // 32 set when token t
    is allowed (llguidance's and xgrammar's layout); a row of all ones (-1) is unconstrained.
    Disallowed logits become a huge negative value, so they are never sampled and their
    logprobs are floored. Skipped by `lax.cond` when no row is constrained."""
    B, V = logits.shape

    def masked():
        bits = (mask[:, :, None] >> jnp.arange(MASK_BITS, dtype=jnp.int32)) & 1  # [B, W, 32]
        allowed = bits.reshape(B, -1)[:, :V].astype(bool)
        return jnp.where(allowed, logits, _MASKED)

    return jax.lax.cond(jnp.any(mask != -1), masked, lambda: logits)


def seed_key(seed: int) -> np.ndarray:
    """Threefry key data `[2]` uint32 for a 64-bit seed (host side, no device work)."""
    seed &= (1 << 64) - 1
    return np.asarray([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def _bisect(x: jax.Array, ok) -> jax.Array:
    """Largest threshold t (to bisection precision) per row with ok(t) true; ok is monotone:
    true at the row's minimum, and keeping `x >= t` stays acceptable as t decreases."""

    def body(_, c):
        lo, hi = c
        mid = (lo + hi) / 2
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    return jax.lax.fori_loop(0, _BISECT_STEPS, body, (jnp.min(x, -1), jnp.max(x, -1)))[0]


def _draw(p: jax.Array, u: jax.Array) -> jax.Array:
    """Two-level inverse CDF: token index for unnormalized probabilities p [B,V], u [B,2]."""
    B, V = p.shape
    nb = -(-V // BLOCK)
    pb = jnp.pad(p, ((0, 0), (0, nb * BLOCK - V))).reshape(B, nb, BLOCK)
    bsum = pb.sum(-1)  # [B, nb]
    cb = jnp.cumsum(bsum, -1)
    target = u[:, 0] * cb[:, -1]
    last_nz = jnp.argmax(jnp.where(bsum > 0, jnp.arange(nb), -1), -1)
    blk = jnp.where(jnp.any(cb > target[:, None], -1), jnp.argmax(cb > target[:, None], -1), last_nz)
    blk = jnp.where(bsum[jnp.arange(B), blk] > 0, blk, last_nz)
    row = pb[jnp.arange(B), blk]  # [B, BLOCK]
    cr = jnp.cumsum(row, -1)
    t2 = u[:, 1] * cr[:, -1]
    idx = jnp.where(jnp.any(cr > t2[:, None], -1), jnp.argmax(cr > t2[:, None], -1), jnp.argmax(row, -1))
    idx = jnp.where(row[jnp.arange(B), idx] > 0, idx, jnp.argmax(row, -1))
    return (blk * BLOCK + idx).astype(jnp.int32)


def _top_k(x: jax.Array, k: int, kernels: bool) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k`, or the CPU kernel's (same result, without XLA:CPU's sort) for a model on
    the CPU kernel path."""
    if kernels:
        from llama_jax import cpu_kernels

        return cpu_kernels.top_k(x, k)
    return jax.lax.top_k(x, k)


def sample(
    logits: jax.Array, s: SlotSampling, positions: jax.Array, kernels: bool = False
) -> tuple[jax.Array, jax.Array]:
    """logits f32 [B,V] -> (tokens int32 [B], logprob of each token under the raw logits [B]).

    `positions [B]` is the index of the token being generated, folded into each slot's key.
    When every row is greedy the sampling work is skipped (`lax.cond`).
    """
    # (XLA:CPU's argmax reduce takes ~1 ms for 16 rows of 49152 logits; the top-1 kernel a tenth.)
    greedy = _top_k(logits, 1, kernels)[1][:, 0] if kernels else jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = jax.lax.cond(
        jnp.any(s.temperature > 0),
        lambda: jnp.where(s.temperature > 0, _sample_rows(logits, s, positions, kernels), greedy),
        lambda: greedy,
    )
    lse = jax.nn.logsumexp(logits, axis=-1)
    logprob = jnp.take_along_axis(logits, tokens[:, None], -1)[:, 0] - lse
    return tokens, jnp.maximum(logprob, _LOGPROB_FLOOR)


def top_logprobs(logits: jax.Array, s: SlotSampling, kernels: bool = False) -> tuple[jax.Array, jax.Array]:
    """The `MAX_TOP_LOGPROBS` most likely tokens and their log-probabilities under the raw
    logits, [B, 20] each; computed only when some row asks (`lax.cond`), zeros otherwise."""
    B, V = logits.shape
    k = min(MAX_TOP_LOGPROBS, V)

    def compute():
        vals, ids = _top_k(logits, k, kernels)
        lps = vals - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return ids.astype(jnp.int32), jnp.maximum(lps, _LOGPROB_FLOOR)

    def skip():
        return jnp.zeros((B, k), jnp.int32), jnp.zeros((B, k), jnp.float32)

    return jax.lax.cond(jnp.any(s.top_logprobs > 0), compute, skip)


def _sample_rows(
    logits: jax.Array, s: SlotSampling, positions: jax.Array, kernels: bool = False
) -> jax.Array:
    """Filters in llama.cpp's and vLLM's order: top-k, then top-p over the renormalized top-k
    distribution, and min-p relative to the most likely token."""
    B, V = logits.shape
    x = logits / jnp.maximum(s.temperature, 1e-5)[:, None]
    k = jnp.where(s.top_k <= 0, V, jnp.minimum(s.top_k, V))
    k_on = k < V
    p_on = s.top_p < 1.0
    # The normalizer (a pass over the vocabulary) serves only top-k's and top-p's masses.
    lse = jax.lax.cond(
        jnp.any(k_on | p_on), lambda: jax.nn.logsumexp(x, axis=-1), lambda: jnp.zeros((B,), x.dtype)
    )
    nc = min(CANDIDATES, V)
    # The barrier keeps XLA from fusing top_k (a sort) into the elementwise consumers below,
    # which recomputed it per element: 175 ms instead of 6 ms for [16, 49152] on XLA:CPU.
    top = jax.lax.optimization_barrier(_top_k(x, nc, kernels)[0])  # [B, nc], descending
    neg = jnp.float32(-jnp.inf)

    def mass(t):  # probability of the tokens with x >= t, per row
        return jnp.sum(jnp.where(x >= t[:, None], jnp.exp(x - lse[:, None]), 0.0), -1)

    fast_k = jnp.take_along_axis(top, jnp.clip(k - 1, 0, nc - 1)[:, None], -1)[:, 0]
    slow_k = k_on & (k > nc)
    thr_k = jax.lax.cond(
        jnp.any(slow_k),
        lambda: jnp.where(slow_k, _bisect(x, lambda t: jnp.sum(x >= t[:, None], -1) >= k), fast_k),
        lambda: fast_k,
    )
    thr_k = jnp.where(k_on, thr_k, neg)
    # The top-k set's mass (a pass of exp over the vocabulary) only when some row has top-k on.
    kept = jax.lax.cond(
        jnp.any(k_on), lambda: jnp.where(k_on, mass(thr_k), 1.0), lambda: jnp.ones_like(thr_k)
    )
    target = s.top_p * kept
    cum = jnp.cumsum(jnp.exp(top - lse[:, None]), -1)
    j = jnp.sum(cum < target[:, None], -1)  # nucleus = candidates 0..j
    fast_p = jnp.take_along_axis(top, jnp.clip(j, 0, nc - 1)[:, None], -1)[:, 0]
    slow_p = p_on & (j >= nc)
    thr_p = jax.lax.cond(
        jnp.any(slow_p),
        lambda: jnp.where(slow_p, _bisect(x, lambda t: mass(t) >= target), fast_p),
        lambda: fast_p,
    )
    thr_min_p = jnp.where(s.min_p > 0, top[:, 0] + jnp.log(jnp.maximum(s.min_p, 1e-30)), neg)
    thr = jnp.maximum(jnp.maximum(thr_k, jnp.where(p_on, thr_p, neg)), thr_min_p)
    thr, m = jax.lax.optimization_barrier((thr, top[:, 0]))
    p = jnp.where(x >= thr[:, None], jnp.exp(x - m[:, None]), 0.0)
    keys = jax.vmap(lambda kd, pos: jax.random.fold_in(jax.random.wrap_key_data(kd), pos))(s.key, positions)
    u = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys)
    return _draw(p, u)
