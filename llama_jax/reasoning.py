"""Reasoning ("thinking") output: the text a model writes between markers such as `<think>`
and `</think>` before its answer, split off the answer (OpenAI-compatible servers return it
as `reasoning_content`).

- Markers: the first known pair whose closing marker the chat template mentions, else
  `<think>`/`</think>` (DeepSeek-R1, Qwen3, SmolLM3, ...).
- A block counts only at the start of the output (after white space), as in llama.cpp and
  vLLM: a `<think>` later in an answer is answer text.
- A template that opens the block in the prompt itself (DeepSeek-R1's `<think>\\n` after the
  assistant header) starts the output inside it: `opens_in_prompt`.
- Streaming: `ReasoningStream` turns text deltas into ("reasoning", text) and ("content",
  text) pieces, holding back text that may be a marker split across tokens. An output with
  no block comes out as content, unchanged. A block cut off by `max_tokens` is reasoning.
"""

from __future__ import annotations

MARKERS = (
    ("<think>", "</think>"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),  # Command A
    ("<seed:think>", "</seed:think>"),  # Seed-OSS
)

Markers = tuple[str, str]


def template_markers(template_source: str) -> Markers:
    """The reasoning markers a chat template uses (the default pair when it names none)."""
    for pair in MARKERS:
        if pair[1] in template_source:
            return pair
    return MARKERS[0]


def opens_in_prompt(prompt: str, markers: Markers) -> bool:
    """The prompt ends inside a reasoning block: an opening marker with only white space after it."""
    start = prompt.rfind(markers[0])
    return start >= 0 and not prompt[start + len(markers[0]) :].strip()


def split_reasoning(text: str, markers: Markers, inside: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole output."""
    stream = ReasoningStream(markers, inside)
    stream.feed(text)
    stream.finish()
    return stream.reasoning, stream.content


class ReasoningStream:
    """`feed(text)` returns ("reasoning" | "content", text) pieces; `finish()` the rest.
    `reasoning` (None when there was no block) and `content` hold what was seen."""

    def __init__(self, markers: Markers, inside: bool = False):
        self.open, self.close = markers
        self._state = "inside" if inside else "start"  # start -> inside -> after, or start -> after
        self._buf = ""
        self._lead = inside  # white space at the start of the reasoning or after it is dropped
        self.reasoning: str | None = "" if inside else None
        self.content = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(self.open):
                self._buf, self._state, self._lead = head[len(self.open) :], "inside", True
                self.reasoning = ""
            elif self.open.startswith(head):  # white space or a marker's beginning: wait
                return out
            else:
                self._state = "after"
        if self._state == "inside":
            end = self._buf.find(self.close)
            if end < 0:
                keep = _partial_suffix(self._buf, self.close)
                out += self._emit("reasoning", self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            out += self._emit("reasoning", self._buf[:end])
            self._buf, self._state, self._lead = self._buf[end + len(self.close) :], "after", True
        out += self._emit("content", self._buf)
        self._buf = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        kind = "reasoning" if self._state == "inside" else "content"
        out = self._emit(kind, self._buf)
        self._buf = ""
        return out

    def _emit(self, kind: str, text: str) -> list[tuple[str, str]]:
        if self._lead:
            text = text.lstrip()
            self._lead = not text
        if not text:
            return []
        if kind == "reasoning":
            self.reasoning = (self.reasoning or "") + text
        else:
            self.content += text
        return [(kind, text)]


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
