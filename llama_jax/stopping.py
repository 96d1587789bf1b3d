"""When a request stops: its `StopRules`, and stop strings matched on a stream of text deltas.

`StopRules` is the validated description of one request's limits (sampling is
`sampling.SamplingParams`'s): at most `max_tokens` tokens, stop strings (excluded from the
output), stop token ids (included) and whether EOS ends it.

Text that could be the start of a stop string is held back until it is known not to be one,
so a stream never shows a stop string or part of one; the stop string itself is excluded
from the output, and matches across token boundaries are found.

The stops are one Aho–Corasick automaton: each delta costs time linear in its own length
(plus copying the held-back text, at most the longest stop), however many and however long
the stops are. Their total length is capped (`MAX_STOP_CHARS`) because building the automaton
costs time linear in it, on the caller's thread, per request.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence

from llama_jax.errors import InvalidRequestError

MAX_STOP_CHARS = 4096  # all the stop strings of one request together
DEFAULT_MAX_TOKENS = 256  # the seed's default


@dataclasses.dataclass(frozen=True)
class StopRules:
    """When one request's generation ends, besides the context filling up. `stop` may be one
    string; `stop_token_ids` end it like EOS (the token is in the output, its text is not)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False  # EOS does not end the output (benchmarks: a fixed length)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, numbers.Integral):
            raise InvalidRequestError(
                f"max_tokens must be an integer, got {self.max_tokens!r}", param="max_tokens"
            )
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidRequestError("stop must be non-empty strings", param="stop")
        check_stops(stop)
        ids = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in ids):
            raise InvalidRequestError("stop_token_ids must be token ids", param="stop_token_ids")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)


def check_stops(stops: Sequence[str]) -> None:
    """Refuse stop strings whose total length exceeds `MAX_STOP_CHARS` (a 400 naming `stop`)."""
    total = sum(len(s) for s in stops)
    if total > MAX_STOP_CHARS:
        raise InvalidRequestError(
            f"stop strings total {total} characters (limit {MAX_STOP_CHARS})", param="stop"
        )


class _Automaton:
    """Aho–Corasick over the stops. State 0 is the root; a state is a prefix of some stop, and
    the state after some text is the longest suffix of that text that is a prefix of a stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]  # the length of the prefix a state stands for
        self.fail = [0]  # the state of the longest proper suffix of this prefix
        self.found = [0]  # the length of the longest stop that ends at this state, 0 if none
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.fail.append(0)
                    self.found.append(0)
                state = nxt
            self.found[state] = len(stop)
        queue = list(self.goto[0].values())  # breadth first: a state's fail link is shallower
        for state in queue:
            for ch, nxt in self.goto[state].items():
                queue.append(nxt)
                if state:
                    self.fail[nxt] = self.step(self.fail[state], ch)
                self.found[nxt] = self.found[nxt] or self.found[self.fail[nxt]]

    def step(self, state: int, ch: str) -> int:
        # Amortized O(1): each fail link taken shortens the match, which grows by one per char.
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)


@functools.lru_cache(maxsize=64)  # the n choices of a request, and clients that repeat their stops
def _automaton(stops: tuple[str, ...]) -> _Automaton:
    return _Automaton(stops)


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        check_stops(self.stops)
        self._auto = _automaton(self.stops) if self.stops else None
        self._state = 0
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text that is now safe to emit. After a match, `stopped` is True and the rest is dropped.
        The earliest-starting stop wins when several end in the same delta."""
        if self.stopped:
            return ""
        buf = self._held + delta
        auto = self._auto
        if auto is None:
            return buf
        state, offset, first = self._state, len(self._held) + 1, None
        for i, ch in enumerate(delta):
            state = auto.step(state, ch)
            length = auto.found[state]
            if length and (first is None or offset + i - length < first):
                first = offset + i - length
        if first is not None:
            self.stopped = True
            self._held = ""
            return buf[:first]
        self._state = state
        hold = auto.depth[state]
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation: the held-back text, which turned out not to be a stop."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out
