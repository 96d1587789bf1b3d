"""Stop strings on a stream of text deltas.

Text that could be the start of a stop string is held back until it is known not to be one,
so a stream never shows a stop string or part of one; the stop string itself is excluded
from the output, and matches across token boundaries are found.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text that is now safe to emit. After a match, `stopped` is True and the rest is dropped."""
        if self.stopped:
            return ""
        buf = self._held + delta
        if not self.stops:
            return buf
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation: the held-back text, which turned out not to be a stop."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out
