"""A deterministic fake `Runner` (llama_jax/runner.py's protocol) for exact scheduler tests.

No model and no device: each slot's "KV cache" is the list of token ids written at its
positions. Prefill writes its chunk at `start` and, at a prompt's last chunk, samples the first
token; decode writes each active slot's last token and samples the next one. The token sampled
after token t is always (t + 1) % V, the first one a constraint mask allows counting up from
there, so every output can be worked out by hand. Its logprob is -1.0 and its alternatives are
the tokens after it, with logprobs -1, -2, ... `calls` records each device call, for tests of
the schedule itself; `FakeState.cache` is what each slot holds, for tests of prefix reuse.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.sampling import MAX_TOP_LOGPROBS, SlotSampling

K = MAX_TOP_LOGPROBS  # alternatives per packed row, as the real runner packs them


@dataclasses.dataclass
class FakeState:
    cache: list[list[int]]  # per slot: the token id at each written position
    last: list[int]  # per slot: the last sampled token (the next decode step's input)


class _Packed(np.ndarray):
    """A step's output as the scheduler reads it: an array, whose transfer is already done."""

    def copy_to_host_async(self) -> None:
        return None


class _Compiled:
    """Nothing to compile: every step shape is ready."""

    def ready(self, shape) -> bool:
        return True

    def request(self, shapes) -> None:
        return None


class FakeRunner:
    def __init__(
        self, cfg: LlamaConfig, max_slots: int = 2, max_seq_len: int = 64, max_prefill_chunk: int = 8
    ):
        self.cfg = cfg
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.max_prefill_chunk = max_prefill_chunk
        self.compiler = _Compiled()
        self.calls: list[tuple] = []

    # -- the outputs, by hand --------------------------------------------------------------------

    def next_token(self, last: int, mask: np.ndarray | None = None) -> int:
        V = self.cfg.vocab_size
        for step in range(1, V + 1):
            t = (last + step) % V
            if mask is None or (int(mask[t >> 5]) >> (t & 31)) & 1:
                return t
        raise AssertionError("the mask allows no token")

    def _row(self, token: int) -> np.ndarray:
        V = self.cfg.vocab_size
        top = np.asarray([(token + j) % V for j in range(K)], np.int32)
        lps = -1.0 - np.arange(K, dtype=np.float32)
        return np.concatenate(
            [[token], np.float32(-1.0).reshape(1).view(np.int32), top, lps.view(np.int32)]
        ).astype(np.int32)

    def _packed(self, rows: list[np.ndarray]) -> _Packed:
        return np.stack(rows).view(_Packed)

    # -- the Runner protocol ---------------------------------------------------------------------

    def init_state(self) -> FakeState:
        return FakeState([[] for _ in range(self.max_slots)], [0] * self.max_slots)

    def prefill(
        self,
        state: FakeState,
        chunk: np.ndarray,
        slot: int,
        start: int,
        row: SlotSampling,
        mask: np.ndarray | None = None,
    ) -> tuple[FakeState, _Packed]:
        chunk = [int(t) for t in chunk]
        assert 0 < len(chunk) <= self.max_prefill_chunk
        assert len(state.cache[slot]) >= start, "a chunk must follow what its slot already holds"
        self.calls.append(("prefill", slot, start, len(chunk)))
        state.cache[slot] = state.cache[slot][:start] + chunk
        token = self.next_token(chunk[-1], None if mask is None else mask[0])
        state.last[slot] = token
        return state, self._packed([self._row(token)])

    def decode(
        self, state: FakeState, active: np.ndarray, max_length: int, mask: np.ndarray | None = None
    ) -> tuple[FakeState, _Packed]:
        slots = [int(s) for s in np.flatnonzero(active)]
        self.calls.append(("decode", tuple(slots)))
        rows = [np.zeros(2 + 2 * K, np.int32) for _ in range(self.max_slots)]
        for s in slots:
            assert len(state.cache[s]) < max_length, "max_length bounds every active sequence"
            state.cache[s].append(state.last[s])
            state.last[s] = self.next_token(state.last[s], None if mask is None else mask[s])
            rows[s] = self._row(state.last[s])
        return state, self._packed(rows)

    def copy_slot(self, state: FakeState, src: int, dst: int, n: int) -> FakeState:
        assert len(state.cache[src]) >= n
        self.calls.append(("copy", src, dst, n))
        state.cache[dst] = list(state.cache[src][:n])
        return state

    def embed(self, rows: list[list[int]], max_batch: int = 16) -> np.ndarray:
        """Row i's vector is its length in dimension 0 (not normalized: easy to check)."""
        self.calls.append(("embed", len(rows)))
        out = np.zeros((len(rows), self.cfg.dim), np.float32)
        out[:, 0] = [len(r) for r in rows]
        return out

    def warmup(self, state: FakeState, progress: bool = False) -> FakeState:
        return state

    def prefill_shape(self, n: int, start: int) -> tuple:
        return ("prefill", n, start)

    def decode_shape(self, rows: int, max_length: int) -> tuple:
        return ("decode", rows, max_length)

    def copy_shape(self, n: int) -> tuple:
        return ("copy", 0, n)

    def first_shapes(self) -> list[tuple]:
        return []

    def warmup_shapes(self) -> list[tuple]:
        return []
