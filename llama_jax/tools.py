"""Function calling: tools into the prompt, grammars for forced calls, calls out of the output.

The wire format of a call is Hermes' (also Qwen 2.5's):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- Prompt: a chat template that knows tools (it mentions `tools`) gets them as its `tools`
  variable; any other template gets the built-in format, a system message that lists the
  tools and asks for calls in the format above (Qwen 2.5's wording). Assistant `tool_calls`
  and `tool` results are rendered the same way, so a conversation can go round the loop.
- `tool_choice` "required" or a named function: the output is constrained by `tool_grammar`
  to one call (or several, with `parallel_tool_calls`) of the allowed tools, each with
  arguments valid against the tool's parameter schema. "auto": the model writes freely and
  `parse_tool_calls` finds calls in Hermes/Qwen tags or Llama 3.1's bare JSON.
- Streaming: `ToolCallStream` turns text deltas into content and OpenAI tool-call deltas
  (the name first, then argument fragments as they are generated).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from llama_jax.constrain import JSON_OPTIONS, MAX_GRAMMAR_CHARS, Grammar, closed_objects
from llama_jax.errors import InvalidRequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_TOOLS = 128  # OpenAI's limit
_PYTHON_TAG = "<|python_tag|>"

BUILTIN_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call the model made. `arguments` is a JSON text (OpenAI's wire format)."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=lambda: new_call_id())

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return out if index is None else {"index": index, **out}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# -- requests ---------------------------------------------------------------------------------


def check_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI `tools`, validated: at most MAX_TOOLS function tools with unique names and object
    parameter schemas, all of them together at most MAX_GRAMMAR_CHARS of JSON (they become one
    grammar when a call is required)."""
    if tools and len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"{len(tools)} tools given (limit {MAX_TOOLS})", param="tools")
    out, names = [], set()
    for i, tool in enumerate(tools or ()):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise InvalidRequestError(f"{where} must be a function tool", param=where)
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(f"{where}.function needs a name", param=f"{where}.function")
        name = fn["name"]
        if not _NAME.match(name):
            raise InvalidRequestError(
                f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}",
                param=f"{where}.function.name",
            )
        if name in names:
            raise InvalidRequestError(f"tool {name!r} is defined twice", param=f"{where}.function.name")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise InvalidRequestError(
                f"{where}.function.parameters must be a JSON schema object", param=where
            )
        out.append({"type": "function", "function": {**fn, "parameters": dict(params)}})
    size = len(json.dumps([t["function"]["parameters"] for t in out], default=str))
    if size > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(
            f"the tools' parameter schemas are {size} characters of JSON (limit {MAX_GRAMMAR_CHARS})",
            param="tools",
        )
    return out


def chosen_tools(
    tools: list[dict[str, Any]], tool_choice: str | Mapping[str, Any] | None
) -> tuple[str, list[dict]]:
    """(mode, tools the output may call): mode is "none", "auto" or "required" (a named function
    is "required" with that one tool)."""
    if tool_choice is None:
        return ("auto" if tools else "none"), tools
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise InvalidRequestError(
                f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}",
                param="tool_choice",
            )
        if tool_choice != "none" and not tools:
            raise InvalidRequestError(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
        return tool_choice, tools
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise InvalidRequestError(
            'tool_choice must be {"type": "function", "function": {"name": ...}}', param="tool_choice"
        )
    match = [t for t in tools if t["function"]["name"] == name]
    if not match:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return "required", match


def tool_grammar(tools: list[dict[str, Any]], parallel: bool = True) -> Grammar:
    """The output must be one call (or several, newline-separated, when `parallel`) to one of
    `tools`, each `{"name": ..., "arguments": ...}` with arguments valid for that tool."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": closed_objects(t["function"]["parameters"]),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    body = {"anyOf": calls, "x-guidance": JSON_OPTIONS}
    repeat = ' ("\\n" call)*' if parallel else ""
    lark = f'start: call{repeat}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(body)}\n'
    return Grammar("lark", lark, param="tools")


# -- prompts ----------------------------------------------------------------------------------


def template_knows_tools(source: str) -> bool:
    return re.search(r"\btools\b", source) is not None


def builtin_messages(
    messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Messages for a template that knows nothing of tools: the tool list in the system message,
    assistant calls as `<tool_call>` blocks, tool results as `<tool_response>` user turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            blocks = [_call_block(c) for c in m.pop("tool_calls")]
            text = _text(m.get("content"))
            m["content"] = "\n".join(([text] if text else []) + blocks)
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"}
        out.append(m)
    if tools:
        listing = BUILTIN_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "role": "system", "content": f"{_text(out[0].get('content'))}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows tools: call arguments as objects, which is what such
    templates (Qwen 2.5, Llama 3.1, Hermes) serialize with `tojson`."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _loads_or_text(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def _call_block(call: Mapping[str, Any]) -> str:
    fn = call["function"]
    body = {"name": fn["name"], "arguments": _loads_or_text(fn.get("arguments", "{}"))}
    return f"{OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CLOSE}"


def _loads_or_text(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


# -- output -----------------------------------------------------------------------------------


def _as_call(obj: Any, allowed: set[str] | None) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _loads_or_text(args)
    if not isinstance(args, dict) or (allowed is not None and obj["name"] not in allowed):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, allowed: set[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) from a whole output, exactly as `ToolCallStream` streams it."""
    stream = ToolCallStream(allowed)
    stream.feed(text)
    stream.finish()
    return stream.content, stream.calls


def _bare_json_calls(text: str, allowed: set[str] | None) -> list[ToolCall]:
    """Llama 3.1's calls: bare JSON `{"name": ..., "parameters": ...}`, optionally after
    `<|python_tag|>`, several separated by ';' or newlines; [] unless all of it is calls."""
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("{"):
        return []
    whole = _loads_or_text(body)
    parts = (
        [whole] if whole is not body else [_loads_or_text(p) for p in re.split(r"\s*[;\n]\s*(?=\{)", body)]
    )
    found = [_as_call(p, allowed) for p in parts]
    return found if found and all(found) else []  # type: ignore[return-value]


class ToolCallStream:
    """Streams an output that may hold tool calls: `feed(text)` returns OpenAI delta pieces,
    ("content", text) or ("call", index, {tool call delta}), holding back text that may start
    a call; `finish()` returns the rest. `calls` and `content` hold what was seen.

    A Llama 3.1 model writes a call as bare JSON, so an output that starts with '{' (or
    `<|python_tag|>`) is held until it ends, then parsed as calls or sent as content."""

    def __init__(self, allowed: set[str] | None = None):
        self.allowed = allowed
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not yet classified
        self._content = ""  # content seen; the first `_sent` characters were emitted
        self._sent = 0
        self._bare = True  # nothing but content yet: may still be a bare-JSON call
        self._call: dict[str, Any] | None = None  # the open call: id, name, argument chars sent

    @property
    def content(self) -> str:
        return self._content

    def feed(self, text: str) -> list[tuple]:
        self._buf += text
        out: list[tuple] = []
        while True:
            if self._call is None:
                i = self._buf.find(OPEN)
                if i < 0:
                    return out + self._add_content(self._safe_prefix())
                out += self._add_content(i)
                self._bare = False
                self._content = self._content[: max(self._sent, len(self._content.rstrip()))]
                out += self._release()
                self._buf = self._buf[len(OPEN) :]
                self._call = {"id": new_call_id(), "name": None, "sent": 0}
            j = _close_at(self._buf)
            out += self._stream_call(self._buf if j < 0 else self._buf[:j], done=j >= 0)
            if j < 0:
                return out
            self._buf = self._buf[j + len(CLOSE) :]
            self._call = None

    def finish(self) -> list[tuple]:
        out: list[tuple] = []
        if self._call is not None:
            out += self._stream_call(self._buf, done=True)
            self._buf, self._call = "", None
        out += self._add_content(len(self._buf))
        if self._bare and self._sent == 0:
            calls = _bare_json_calls(self._content, self.allowed)
            if calls:
                self._content = ""
                for c in calls:
                    out += self._deltas(c)
                return out
        self._bare = False
        if self.calls and not self._content[self._sent :].strip():
            self._content = self._content[: self._sent]  # whitespace around calls is not content
        return out + self._release(hold_space=False)

    def _safe_prefix(self) -> int:
        """How much of the buffer cannot be the start of a call tag."""
        for k in range(min(len(OPEN) - 1, len(self._buf)), 0, -1):
            if OPEN.startswith(self._buf[-k:]):
                return len(self._buf) - k
        return len(self._buf)

    def _add_content(self, i: int) -> list[tuple]:
        self._content += self._buf[:i]
        self._buf = self._buf[i:]
        if self._bare:
            head = self._content.lstrip()
            if (
                not head
                or head.startswith("{")
                or head.startswith(_PYTHON_TAG)
                or _PYTHON_TAG.startswith(head)
            ):
                return []
            self._bare = False
        return self._release()

    def _release(self, hold_space: bool = True) -> list[tuple]:
        """Emit the content not yet sent; trailing whitespace waits (it is dropped before a call)."""
        end = len(self._content.rstrip()) if hold_space else len(self._content)
        if end <= self._sent:
            return []
        text, self._sent = self._content[self._sent : end], end
        return [("content", text)]

    def _deltas(self, call: ToolCall) -> list[tuple]:
        index = len(self.calls)
        self.calls.append(call)
        return [
            (
                "call",
                index,
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
            ),
            ("call", index, {"function": {"arguments": call.arguments}}),
        ]

    def _stream_call(self, body: str, done: bool) -> list[tuple]:
        """Deltas for the open call's body so far: in the Hermes layout, the name once known,
        then argument text up to the end of the arguments object; in any other, the whole
        call when it closes (or, if it is not a call, the block as content)."""
        call = self._call
        out: list[tuple] = []
        m = re.match(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\{)', body)
        if m and (self.allowed is None or m.group(1) in self.allowed):
            index = len(self.calls)
            if call["name"] is None:
                call["name"] = m.group(1)
                delta = {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": ""},
                }
                out.append(("call", index, delta))
            args = body[m.end() :]
            end = _json_end(args)
            upto = len(args) if end is None else end
            if upto > call["sent"]:
                out.append(("call", index, {"function": {"arguments": args[call["sent"] : upto]}}))
                call["sent"] = upto
            if done:
                self.calls.append(ToolCall(call["name"], args[:upto], call["id"]))
            return out
        if not done:
            return out
        parsed = _as_call(_loads_or_text(body.strip()), self.allowed)
        if parsed is None:  # not a call after all
            self._content += OPEN + body + CLOSE
            return self._release()
        return self._deltas(dataclasses.replace(parsed, id=call["id"]))


def _outside_strings(text: str):
    """(index, char) for each character of `text` outside JSON strings (quotes included)."""
    in_str, escaped = False, False
    for i, ch in enumerate(text):
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        else:
            yield i, ch


def _close_at(body: str) -> int:
    """Where the open call's closing tag starts in `body`, -1 if not yet: a tag inside a JSON
    string is text (a forced call's grammar lets a string hold anything, "</tool_call>" too)."""
    return next((i for i, ch in _outside_strings(body) if ch == "<" and body.startswith(CLOSE, i)), -1)


def _json_end(text: str) -> int | None:
    """Index just past the JSON value that starts `text` (an object or array), None if it is
    not complete yet."""
    depth = 0
    for i, ch in _outside_strings(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None
