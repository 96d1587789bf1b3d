"""One chat choice's generated text read as it streams: its reasoning block (split off unless
the reasoning format is "none"), its content and its tool calls. Chat completions and the
Responses API shape these pieces in their own wire formats."""

from __future__ import annotations

from llama_jax import PreparedChat, ToolCall


class OutputReader:
    """`feed(text)` returns pieces: ("reasoning", text), ("content", text) or ("call", index,
    {OpenAI tool-call delta}); `feed(text, finish=True)` with the last text also returns what
    was held back (a possible marker or call)."""

    def __init__(self, prep: PreparedChat, split_reasoning: bool):
        self._reasoning = prep.reasoning_stream() if split_reasoning else None
        self._tools = prep.tool_stream()
        self._text = ""  # content as generated, calls included

    def feed(self, text: str, finish: bool = False) -> list[tuple]:
        out: list[tuple] = []
        if self._reasoning is not None:
            parts = self._reasoning.feed(text) + (self._reasoning.finish() if finish else [])
            out += [p for p in parts if p[0] == "reasoning"]
            text = "".join(t for kind, t in parts if kind == "content")
        self._text += text
        if self._tools is None:
            return out + ([("content", text)] if text else [])
        return out + self._tools.feed(text) + (self._tools.finish() if finish else [])

    @property
    def reasoning(self) -> str | None:
        """The reasoning text; None when there was no block (or it is not split off)."""
        return None if self._reasoning is None else self._reasoning.reasoning

    @property
    def calls(self) -> list[ToolCall]:
        return [] if self._tools is None else self._tools.calls

    @property
    def content(self) -> str:
        """The answer: with calls, the text around them; else the whole text after reasoning."""
        return self._tools.content if self.calls else self._text  # type: ignore[union-attr]


def splits_reasoning(requested: str | None, configured: str) -> bool:
    """Whether reasoning goes to its own field: the request's `reasoning_format`, else the server's."""
    return (requested or configured) != "none"
