"""Token sampling inside the jitted step: greedy, temperature, top-k, top-p, min-p, seeds.

`SamplingParams` is the user-facing, validated description of one request's sampling. Each of
its fields is defined once, with its default, valid range and description (a `Knob`, listed in
`FIELDS`): `SamplingParams` validates against it, and the HTTP schema (`serve/schemas.py`) and
the CLI's flags (`cli.py`) take their defaults, ranges and help from it. When a request stops
(token limits, stop strings) is `stopping.StopRules`'s, and what its output must match is a
`constrain.Grammar` on the request: neither is sampling.

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
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.errors import InvalidRequestError

CANDIDATES = 64  # logits examined for top-k / top-p before falling back to bisection
BLOCK = 256  # tokens per block in the two-level inverse-CDF draw
_BISECT_STEPS = 32
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 300  # entries of logit_bias per request
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf: OpenAI-style servers report this instead


@dataclasses.dataclass(frozen=True)
class Knob:
    """One sampling field: its default, valid range (pydantic's `ge`/`gt`/`le`/`lt`) and what it
    does. For a mapping (`logit_bias`), the range is its values' and `entries` bounds its size."""

    type: type  # int or float: the value's (a mapping's values')
    default: Any
    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    entries: int | None = None  # a mapping of token ids to values, with at most this many entries
    flag: bool = True  # also a flag of `llama-jax chat` and `generate`

    def bounds(self) -> dict[str, float]:
        """The valid range as pydantic `Field` keywords."""
        return {k: v for k in ("ge", "gt", "le", "lt") if (v := getattr(self, k)) is not None}

    def range_text(self) -> str:
        lo = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else "(-inf"
        hi = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else "inf)"
        return f"{lo}, {hi}"

    def contains(self, x: float) -> bool:
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    def check(self, name: str, value: Any) -> None:
        """Raise `InvalidRequestError` naming `name` unless `value` is of this field's type and range."""
        if value is None and self.default is None:
            return
        if self.entries is not None:
            self._check_mapping(name, value)
            return
        kind = numbers.Real if self.type is float else numbers.Integral
        if isinstance(value, bool) or not isinstance(value, kind):
            raise InvalidRequestError(
                f"{name} must be {'a number' if self.type is float else 'an integer'}, got {value!r}",
                param=name,
            )
        if not self.contains(value):
            raise InvalidRequestError(f"{name} must be in {self.range_text()}, got {value}", param=name)

    def _check_mapping(self, name: str, value: Any) -> None:
        if not isinstance(value, Mapping):
            raise InvalidRequestError(f"{name} must map token ids to numbers", param=name)
        if len(value) > self.entries:
            raise InvalidRequestError(f"{name} has at most {self.entries} entries", param=name)
        for tok, x in value.items():
            if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or not 0 <= tok < 2**31:
                raise InvalidRequestError(
                    f"{name} keys must be token ids (integers in [0, 2**31)), got {tok!r}", param=name
                )
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not self.contains(x):
                raise InvalidRequestError(
                    f"{name} values must be in {self.range_text()}, got {x!r}", param=name
                )


def _knob(default: Any, description: str, type: type = float, **range_: Any) -> Any:
    knob = Knob(type, default, description, **range_)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata={"knob": knob})
    return dataclasses.field(default=default, metadata={"knob": knob})


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request: each field's default, range and meaning below (the
    one definition of each; `FIELDS` lists them). `temperature=0` is greedy."""

    temperature: float = _knob(
        0.7, "Randomness: logits are divided by it before sampling; 0 is greedy.", ge=0.0, le=2.0
    )
    top_p: float = _knob(
        1.0,
        "Nucleus sampling: keep the most likely tokens whose probabilities add up to top_p "
        "(1: all; 0: only the most likely, greedy).",
        ge=0.0,
        le=1.0,
    )
    top_k: int = _knob(0, "Keep only the top_k most likely tokens (0: off).", int, ge=0, lt=2**31)
    min_p: float = _knob(
        0.0, "Drop tokens less likely than min_p times the most likely one (0: off).", ge=0.0, le=1.0
    )
    seed: int | None = _knob(
        None,
        "Seed of the random draws: a request with a seed gets the same tokens whatever shares the "
        "batch (none: random).",
        int,
        ge=-(2**63),
        lt=2**64,
    )
    top_logprobs: int = _knob(
        0,
        "The most likely alternatives reported with each token, with their log-probabilities.",
        int,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        flag=False,
    )
    presence_penalty: float = _knob(
        0.0, "Subtracted once from the logits of tokens already generated (OpenAI's).", ge=-2.0, le=2.0
    )
    frequency_penalty: float = _knob(
        0.0,
        "Subtracted from a token's logit once per time it was generated (OpenAI's).",
        ge=-2.0,
        le=2.0,
    )
    repetition_penalty: float = _knob(
        1.0,
        "Divides the positive logits, and multiplies the negative ones, of tokens in the prompt or "
        "output (Hugging Face's and llama.cpp's; 1: off).",
        gt=0.0,
        le=10.0,
    )
    logit_bias: Mapping[int, float] = _knob(
        {},
        f"Token id -> a bias added to its logit (at most {MAX_LOGIT_BIAS}; -100 bans a token, "
        "100 forces it).",
        ge=-100.0,
        le=100.0,
        entries=MAX_LOGIT_BIAS,
        flag=False,
    )

    def __post_init__(self):
        for name, knob in FIELDS.items():
            knob.check(name, getattr(self, name))
        if self.top_p == 0:  # only the most likely token survives: greedy
            object.__setattr__(self, "temperature", 0.0)
            object.__setattr__(self, "top_p", 1.0)


# Every sampling field's definition, by name, in `SamplingParams`'s order.
FIELDS: dict[str, Knob] = {f.name: f.metadata["knob"] for f in dataclasses.fields(SamplingParams)}


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
