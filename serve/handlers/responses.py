"""`POST /v1/responses`: OpenAI's Responses API over the same chat path as chat completions.

The input (text, or messages, earlier function calls and their outputs) and `instructions`
become chat messages; `tools` (function tools), `tool_choice` and `text.format` become chat's
tools and `response_format`. The output is a list of items: a `reasoning` item when the
output has a reasoning block (and the reasoning format is not "none"), a `message` with
`output_text`, and a `function_call` per call. Streamed, it is OpenAI's typed events, each
as `event: {type}` then `data: {json}`, numbered by `sequence_number`.

Stateless: nothing is stored, so `previous_response_id` (and `background`) are a 400 and
`store` is reported false; a client sends the whole conversation each time.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from typing import Any

from quart import Blueprint, g

from llama_jax import Delta, LlamaJaxError, SamplingParams
from serve.errors import APIError, bad_request, from_library
from serve.generation import Samples, request_params
from serve.handlers import note_tokens, now, parse_body, record, serving, state, stream_finisher
from serve.output import OutputReader, splits_reasoning
from serve.schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputMessage,
    InputPart,
    ResponsesRequest,
    SamplingFields,
    ToolChoiceFunction,
)
from serve.sse import dumps, sse_response

bp = Blueprint("responses", __name__)


@bp.errorhandler(LlamaJaxError)
async def _library_error(e: LlamaJaxError):
    """The app's mapping of library errors (`serve/errors.py`), naming this API's fields."""
    return _renamed(from_library(e)).response()


@bp.post("/v1/responses")
async def create_response():
    body = await parse_body(ResponsesRequest)
    if body.previous_response_id is not None:
        raise bad_request(
            "previous_response_id is not supported: this server stores no responses. "
            "Send the whole conversation as `input`.",
            "previous_response_id",
        )
    entry, gen = await serving(body.model)
    messages = _messages(body)
    tools = [t.for_chat() for t in body.tools or []]
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    fmt = body.text.format if body.text is not None else None
    # Rendering, tokenizing and compiling a grammar must not stall the event loop.
    prep = await asyncio.to_thread(
        functools.partial(
            gen.prepare_chat,
            messages,
            tools=tools or None,
            tool_choice=choice if tools else None,
            response_format=fmt.response_format() if fmt is not None else None,
            parallel_tool_calls=body.parallel_tool_calls,
            template_kwargs=body.chat_template_kwargs,
        )
    )
    ids = prep.prompt_ids
    fields = SamplingFields.model_construct(
        model=body.model, temperature=body.temperature, top_p=body.top_p, seed=body.seed, top_k=body.top_k
    )
    try:
        params, rules = request_params(fields, gen, len(ids), body.max_output_tokens)
    except APIError as e:
        if e.param == "max_tokens":
            e.param = "max_output_tokens"
        raise
    record().reserve(len(ids) + rules.max_tokens)
    samples = Samples(gen, [ids], params, rules, 1, prep.grammar, client=record().client)
    record().count = lambda: (len(ids), samples.generated)
    split = splits_reasoning(None, state().settings.reasoning_format)
    out = _Output(_response(body, params, entry.answer_name(body.model)), OutputReader(prep, split))

    def finished(d: Delta) -> None:
        reasoning = out.reader.reasoning
        spent = len(gen.tokenizer.encode(reasoning)) if reasoning else 0
        out.finish(d.finish_reason, len(ids), d.usage.completion_tokens, d.usage.cached_tokens, spent)

    if not body.stream:
        async for _, d in samples:
            out.feed(d.text, d.finish_reason is not None)
            if d.finish_reason is not None:
                finished(d)
                note_tokens(len(ids), d.usage.completion_tokens)
        return out.response

    async def events():
        yield out.event("response.created", response=out.snapshot())
        yield out.event("response.in_progress", response=out.snapshot())
        async for _, d in samples:
            for e in out.feed(d.text, d.finish_reason is not None):
                yield e
            if d.finish_reason is not None:
                finished(d)
                for e in out.closing:
                    yield e

    return sse_response(events(), g.request_id, stream_finisher(lambda: (len(ids), samples.generated)))


def _response(body: ResponsesRequest, params: SamplingParams, model: str) -> dict[str, Any]:
    """The response object before any output: the request's settings as they were applied."""
    fmt = body.text.format if body.text is not None else None
    choice = body.tool_choice
    return {
        "id": _item_id("resp"),
        "object": "response",
        "created_at": now(),
        "status": "in_progress",
        "model": model,
        "output": [],
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "tool_choice": choice.model_dump() if isinstance(choice, ToolChoiceFunction) else choice or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "previous_response_id": None,
        "store": False,
        "metadata": body.metadata or {},
        "usage": None,
    }


_PARAMS = {"response_format": "text.format", "messages": "input"}  # chat's names for this API's fields


def _renamed(e: APIError) -> APIError:
    """An error from the chat path, naming this API's field (`text.format`, not `response_format`)."""
    head, dot, rest = (e.param or "").partition(".")
    if head in _PARAMS:
        e.param = _PARAMS[head] + dot + rest
    return e


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's instructions and input as chat messages."""
    out: list[dict[str, Any]] = []
    if body.instructions is not None:
        out.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    for item in body.input:
        if isinstance(item, InputMessage):
            out.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls are one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    if not out or all(m["role"] == "system" for m in out):
        raise bad_request("input has no message to answer", "input")
    return out


def _text(content: str | list[InputPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class _Output:
    """The response being built: output items from the reader's pieces, and the stream events
    that announce them. An item is open while its pieces come; a piece of another kind (or
    the end) closes it."""

    def __init__(self, response: dict[str, Any], reader: OutputReader):
        self.response = response
        self.reader = reader
        self.items: list[dict[str, Any]] = response["output"]
        self._open: dict[str, Any] | None = None
        self._seq = 0
        self.closing: list[bytes] = []  # the events after the last piece

    def snapshot(self) -> dict[str, Any]:
        """The response as it is before any output (for the first events)."""
        return {**self.response, "output": []}

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {dumps(data)}\n\n".encode()

    def feed(self, text: str, finish: bool = False) -> list[bytes]:
        events: list[bytes] = []
        for piece in self.reader.feed(text, finish):
            if piece[0] == "call":
                events += self._call(piece[1], piece[2])
            else:
                events += self._text(piece[0], piece[1])
        return events

    def finish(self, reason: str | None, prompt: int, completion: int, cached: int, reasoning: int) -> None:
        status = "incomplete" if reason == "length" else "completed"
        self.closing = self._close(status)
        self.response["status"] = status
        if reason == "length":
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        self.response["usage"] = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": min(reasoning, completion)},
            "total_tokens": prompt + completion,
        }
        self.closing.append(self.event(f"response.{status}", response=self.response))

    def _start(self, item: dict[str, Any]) -> list[bytes]:
        events = self._close("completed")
        item["status"] = "in_progress"
        self.items.append(item)
        self._open = item
        return [
            *events,
            self.event("response.output_item.added", output_index=len(self.items) - 1, item=item),
        ]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}  # type: ignore[index]

    def _text(self, kind: str, text: str) -> list[bytes]:
        """Text of a message (`output_text`) or of a reasoning item (`reasoning_text`)."""
        item_type, part_type = (
            ("reasoning", "reasoning_text") if kind == "reasoning" else ("message", "output_text")
        )
        events: list[bytes] = []
        if self._open is None or self._open["type"] != item_type:
            item: dict[str, Any] = {"type": item_type, "id": _item_id("rs" if kind == "reasoning" else "msg")}
            if item_type == "message":
                item["role"] = "assistant"
            else:
                item["summary"] = []
            item["content"] = []
            events += self._start(item)
            part: dict[str, Any] = {"type": part_type, "text": ""}
            if part_type == "output_text":
                part |= {"annotations": [], "logprobs": []}
            events.append(
                self.event("response.content_part.added", **self._where(), content_index=0, part=part)
            )
            self._open["content"] = [part]  # type: ignore[index]
        part = self._open["content"][0]  # type: ignore[index]
        part["text"] += text
        delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [*events, self.event(delta, **self._where(), content_index=0, delta=text, **extra)]

    def _call(self, index: int, delta: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        if "id" in delta:  # a new call: its name first, then its arguments in pieces
            item = {
                "type": "function_call",
                "id": _item_id("fc"),
                "call_id": delta["id"],
                "name": delta["function"]["name"],
                "arguments": "",
            }
            events += self._start(item)
        fragment = delta["function"].get("arguments", "")
        if fragment:
            self._open["arguments"] += fragment  # type: ignore[index]
            events.append(
                self.event("response.function_call_arguments.delta", **self._where(), delta=fragment)
            )
        return events

    def _close(self, status: str) -> list[bytes]:
        """Close the open item (its `.done` events)."""
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.items.index(item)}
        events = []
        if item["type"] == "function_call":
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        else:
            part = item["content"][0]
            done = (
                "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            )
            extra = {} if item["type"] == "reasoning" else {"logprobs": []}
            events.append(self.event(done, **where, content_index=0, text=part["text"], **extra))
            events.append(self.event("response.content_part.done", **where, content_index=0, part=part))
        item["status"] = status
        events.append(self.event("response.output_item.done", **where, item=item))
        return events
