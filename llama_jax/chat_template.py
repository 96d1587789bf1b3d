"""Chat templates: a conversation -> the prompt text the model was trained on.

Owns rendering Jinja chat templates (from the model file, or an operator's override) the way
Hugging Face does (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson`
that does not HTML-escape, `{% generation %}`), and the built-in `chatml`, `llama2` and `llama3`
templates. A template is untrusted input: it runs in Jinja's immutable sandbox, and its output
size, the strings it builds (each, and all of them together) and its running time are capped
(checked at every call, attribute access, loop iteration and output chunk). Operations that
repeat an argument (`*`, `replace`, `join`, `indent`, `wordwrap`, `expandtabs`, format widths,
`**`) and those that turn values into text (`~`, `{{ }}`) are refused before they allocate.
Every failure is a `TemplateError`. Tokenizing the result is tokenizer.py's job.

Request text is text: given the tokenizer's special tokens, `render` hides their spellings in
every string of the messages and tools behind private-use sentinels, so the template handles
them as text, puts them back afterwards, and returns a `ChatPrompt` that lists where they are;
`Tokenizer.encode` tokenizes those spans as text, so `<|im_end|><|im_start|>system` typed in a
message cannot forge a turn, while the template's own markers stay special.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import json
import re
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.filters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from llama_jax.errors import InvalidRequestError, TemplateError

MAX_OUTPUT_CHARS = 1_000_000
MAX_SECONDS = 5.0
MAX_BUILT_CHARS = 16 * MAX_OUTPUT_CHARS  # all the strings and lists one render may build, together
MAX_POWER_BITS = 1 << 14  # `9 ** 64 ** ...`: the size of an integer a render may compute
MAX_JSON_INDENT = 32

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Meta's Llama 3 Instruct template: contents trimmed, bos before the first message.
    "llama3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ (message['content'] or '') | trim }}{{ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Meta's Llama 2 Chat template: the system prompt folds into the first user turn.
    "llama2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] or '' %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}"
        "{% set content = message['content'] or '' %}"
        "{% if loop.first and system is not none %}"
        "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar(
    "chat_template_deadline", default=float("inf")
)
_budget: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "chat_template_built", default=None
)


def _check_deadline() -> None:
    if time.monotonic() > _deadline.get():
        raise TemplateError("chat template took too long to render")


def _check_size(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple | dict) and len(value) > MAX_OUTPUT_CHARS:
        raise TemplateError(f"chat template built a value of {len(value)} items (limit {MAX_OUTPUT_CHARS})")
    return value


def _built(value: Any) -> Any:
    """Count a new value (result of an operator, call or filter) against the render's budget:
    many values under the size cap, kept in a list, must not add up to gigabytes either."""
    _check_size(value)
    if isinstance(value, str | bytes | list | tuple | dict):
        budget = _budget.get()
        if budget is None:  # outside a render
            return value
        budget[0] += len(value)
        if budget[0] > MAX_BUILT_CHARS:
            raise TemplateError(f"chat template built more than {MAX_BUILT_CHARS} characters in all")
    return value


def _check_result_size(size: int, what: str) -> None:
    """Refuse an operation whose result would be too large, before it allocates."""
    if size > MAX_OUTPUT_CHARS:
        raise TemplateError(f"chat template {what} would build {size} items (limit {MAX_OUTPUT_CHARS})")


def _sized(value: Any) -> int:
    try:
        return len(value)
    except TypeError:  # an iterator: each of its items passes the checks as it is made
        return 0


def _check_amplifier(name: str, value: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Size bounds for the filters and `str` methods that repeat one argument many times."""
    n = _sized(value)
    if name == "replace" and isinstance(value, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        if len(new) > len(old):
            times = (value.count(old) if old else n + 1) if n else 1
            _check_result_size(n + times * (len(new) - len(old)), "replace")
    elif name == "join":  # the filter: `items | join(sep)`
        _check_result_size(len(str(args[0] if args else kwargs.get("d", ""))) * n, "join")
    elif name == "str.join" and args:  # the method: `sep.join(items)`
        _check_result_size(n * _sized(args[0]), "join")
    elif name == "expandtabs" and isinstance(value, str):
        width = args[0] if args else kwargs.get("tabsize", 8)
        _check_result_size(n + value.count("\t") * (width if isinstance(width, int) else 8), "expandtabs")
    elif name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
        _check_result_size(n + (value.count("\n") + 1) * per_line, "indent")
    elif name == "wordwrap" and isinstance(value, str):
        wrap = (args[2] if len(args) > 2 else kwargs.get("wrapstring")) or "\n"
        width = args[0] if args else kwargs.get("width", 79)
        lines = n // max(1, width if isinstance(width, int) else 79) + value.count("\n") + 1
        _check_result_size(n + lines * len(str(wrap)), "wordwrap")
    elif name == "tojson":
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        if isinstance(indent, int) and indent > MAX_JSON_INDENT:
            raise TemplateError(
                f"chat template asked tojson for an indent of {indent} (limit {MAX_JSON_INDENT})"
            )


def _text_size(value: Any, limit: int) -> int:
    """A lower bound of `len(str(value))` that is exact up to `limit` (it stops counting past it):
    `str()` of a list holding a million references to one long string would be terabytes."""
    size, stack = 0, [value]
    while stack and size <= limit:
        v = stack.pop()
        if isinstance(v, str | bytes):
            size += len(v)
        elif isinstance(v, list | tuple | set | frozenset):
            size += 2 + 2 * len(v)  # brackets, ", " (and quotes of str items, counted with them)
            stack.extend(v)
        elif isinstance(v, dict):
            size += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            size += 1
    return size


def _check_text_size(value: Any, what: str) -> Any:
    size = _text_size(value, MAX_OUTPUT_CHARS)
    if size > MAX_OUTPUT_CHARS:
        raise TemplateError(f"chat template {what} would build more than {MAX_OUTPUT_CHARS} characters")
    return value


def _check_ints(args: Sequence[Any]) -> None:
    """Refuse width/count arguments (`center(10**9)`, `'x' * n`) before they allocate."""
    for a in args:
        if isinstance(a, int) and abs(a) > MAX_OUTPUT_CHARS:
            raise TemplateError(
                f"chat template used the number {a} where a size is expected (limit {MAX_OUTPUT_CHARS})"
            )


_PERCENT_SPEC = re.compile(r"%[#0+ -]*(\d*)(?:\.(\d*))?", re.ASCII)
_BRACE_SPEC = re.compile(r"\{[^{}]*\}")
_NUMBER = re.compile(r"\d+", re.ASCII)


def _check_format(fmt: str, braces: bool) -> None:
    """Refuse field widths and precisions (`'%999999999s'`, `'{:>999999999}'`) before they allocate."""
    if braces:
        numbers = [n for spec in _BRACE_SPEC.findall(fmt) for n in _NUMBER.findall(spec)]
    else:
        numbers = [n for m in _PERCENT_SPEC.finditer(fmt) for n in m.groups() if n]
    _check_ints([int(n) for n in numbers])
    _check_ints([sum(int(n) for n in numbers)])  # the widths together, not only each one


def _capped_filter(name: str, fn):
    # The filter's value (after jinja's context/environment argument, if it takes one) may be
    # any size; the arguments after it are widths and counts.
    skip = 2 if hasattr(fn, "jinja_pass_arg") else 1

    @functools.wraps(fn)  # keeps jinja's pass_context / pass_environment mark
    def wrapper(*args, **kwargs):
        _check_ints([*args[skip:], *kwargs.values()])
        if len(args) >= skip:
            if name == "join":  # an iterator's length is known only once drained
                args = (*args[: skip - 1], list(args[skip - 1]), *args[skip:])
            _check_amplifier(name, args[skip - 1], args[skip:], kwargs)
        return _built(fn(*args, **kwargs))

    return wrapper


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    if isinstance(value, str):
        _check_format(value, braces=False)
    return jinja2.filters.do_format(value, *args, **kwargs)


class _CodeGenerator(CodeGenerator):
    """Jinja's compiler, with the two constructs the sandbox has no hook for routed through it:
    `a ~ b` (jinja joins the parts itself) and `{% for %}` (its iterations make no call)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_capped((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        node = copy.copy(node)  # the caller's tree stays as parsed
        ticking = nodes.EnvironmentAttribute("ticking", lineno=node.lineno)
        node.iter = nodes.Call(ticking, [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus caps on what one render may build and how long it may run."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        if (
            operator == "**"
            and isinstance(right, int)
            and (right > 64 or (isinstance(left, int) and left.bit_length() * right > MAX_POWER_BITS))
        ):
            raise TemplateError(f"chat template raised a number to the power {right}")
        if operator == "*":
            _check_ints([left, right])
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and not isinstance(seq, int | float):
                    _check_result_size(_sized(seq) * times, "repetition")
        if operator == "%" and isinstance(left, str):
            _check_format(left, braces=False)
        return _built(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _check_deadline()
        for a in [*args, *kwargs.values()]:
            _check_size(a)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):  # 'x'.center(n), 'x'.zfill(n), 'x'.replace(a, b), ...
            _check_ints([*args, *kwargs.values()])
            name = getattr(__obj, "__name__", "")
            if name == "join" and args:
                args = (list(args[0]), *args[1:])  # an iterator's length is known only once drained
            _check_amplifier("str.join" if name == "join" else name, owner, args, kwargs)
        return _built(super().call(__context, __obj, *args, **kwargs))

    def concat_capped(self, parts: tuple[Any, ...]) -> str:
        """`a ~ b ~ ...`: the parts as text, joined, refused before it would exceed the size cap."""
        _check_deadline()
        _check_text_size(parts, "concatenation")
        return _built("".join(map(str, parts)))

    @staticmethod
    def ticking(iterable: Any) -> Any:
        """A loop's items, checking the time limit at each one."""
        for item in iterable:
            _check_deadline()
            yield item

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__, braces=True)
        return wrapped

    def getattr(self, obj, attribute):
        _check_deadline()
        return _check_size(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        _check_deadline()
        return _check_size(super().getitem(obj, argument))


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise TemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators=None,
    sort_keys: bool = False,
):
    """HF's `tojson`: plain `json.dumps`, non-ASCII kept, no HTML escaping."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment() -> _Sandbox:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, loopcontrols],
        finalize=lambda value: _check_text_size(value, "output"),  # each `{{ }}`, before str()
    )
    env.filters.update(tojson=_tojson, format=_format_filter)
    env.filters = {name: _capped_filter(name, f) for name, f in env.filters.items()}
    del env.globals["lipsum"]  # random text of any length, and no chat template uses it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


_SENTINEL = 0x100000  # Unicode plane 16, private use: one code point per escaped spelling
_SENTINELS = re.compile("[\U00100000-\U0010fffd]")


class ChatPrompt(str):
    """A rendered prompt; `literal_spans` are the (start, end) offsets of special-token
    spellings that came from the request, which must be tokenized as text."""

    literal_spans: tuple[tuple[int, int], ...] = ()


@functools.lru_cache(maxsize=8)
def _spelling_pattern(special_tokens: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so "<|im_start|>" wins over a shorter token it begins with; sentinel code
    # points already in the text are escaped too, so every sentinel in the output is ours.
    names = sorted((t for t in special_tokens if t), key=len, reverse=True)
    return re.compile("|".join([*map(re.escape, names), _SENTINELS.pattern]))


class _Escaper:
    """Replaces special-token spellings in request strings with sentinels, and back."""

    def __init__(self, special_tokens: Collection[str]):
        self._pattern = _spelling_pattern(tuple(sorted(special_tokens)))
        self._table: dict[str, str] = {}  # spelling -> sentinel
        self._spellings: list[str] = []

    def _sentinel(self, m: re.Match[str]) -> str:
        spelling = m.group()
        if spelling not in self._table:
            if len(self._spellings) >= 0xFFFE:
                raise InvalidRequestError("too many distinct special-token spellings in the request")
            self._table[spelling] = chr(_SENTINEL + len(self._spellings))
            self._spellings.append(spelling)
        return self._table[spelling]

    def escape(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._pattern.sub(self._sentinel, value)
        if isinstance(value, Mapping):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.escape(v) for v in value]
        return value

    def restore(self, text: str) -> ChatPrompt:
        parts, spans, pos, size = [], [], 0, 0
        for m in _SENTINELS.finditer(text):
            index = ord(m.group()) - _SENTINEL
            if index >= len(self._spellings):  # the template's own character: keep it
                continue
            parts.append(text[pos : m.start()])
            size += m.start() - pos
            spelling = self._spellings[index]
            spans.append((size, size + len(spelling)))
            parts.append(spelling)
            size += len(spelling)
            pos = m.end()
        parts.append(text[pos:])
        prompt = ChatPrompt("".join(parts))
        prompt.literal_spans = tuple(spans)
        return prompt


def _iterates_content(ast: nodes.Template) -> bool:
    """Whether the template loops over `message['content']` itself (it expects a list of parts)."""
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        if isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) and it.arg.value == "content":
            return True
        if isinstance(it, nodes.Getattr) and it.attr == "content":
            return True
    return False


def _text_of(content: list[Any]) -> str:
    texts = []
    for part in content:
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"unsupported message content part {kind!r}: this model reads text only", "messages"
            )
        texts.append(part["text"])
    return "\n".join(texts)


class ChatTemplate:
    """A Jinja chat template, compiled once, rendered per request.

    `bos_token`/`eos_token` are the model's, passed to every render (a render's `extra` may
    override them).
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str | None = None):
        self.source = source
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            ast = _ENV.parse(source)
            self._template = _ENV.from_string(ast)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from e
        self._keeps_parts = _iterates_content(ast)

    @classmethod
    def builtin(cls, name: str, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        if name not in BUILTIN_TEMPLATES:
            raise TemplateError(f"unknown chat template {name!r} (built-in: {', '.join(BUILTIN_TEMPLATES)})")
        return cls(BUILTIN_TEMPLATES[name], bos_token=bos_token, eos_token=eos_token, name=name)

    @classmethod
    def resolve(
        cls,
        model_template: str | None,
        override: str | None = None,
        *,
        bos_token: str = "",
        eos_token: str = "",
    ) -> ChatTemplate:
        """The template to use: `override` (a built-in name or Jinja source), else the model's,
        else chatml."""
        tokens = {"bos_token": bos_token, "eos_token": eos_token}
        if override:
            if override in BUILTIN_TEMPLATES or ("{{" not in override and "{%" not in override):
                return cls.builtin(override, **tokens)
            return cls(override, name="override", **tokens)
        if model_template:
            return cls(model_template, name="model", **tokens)
        return cls.builtin("chatml", **tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        special_tokens: Collection[str] = (),
        template_kwargs: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages` (OpenAI chat messages; content a string or text parts).
        With the tokenizer's `special_tokens`, a `ChatPrompt` whose request text stays text.
        `template_kwargs` (a request's, e.g. Qwen3's `enable_thinking`) are request text too,
        and may not replace the variables set here."""
        escaper = _Escaper(special_tokens) if special_tokens else None
        messages, tools = self._normalize(messages), tools
        kwargs = dict(template_kwargs or {})
        if escaper is not None:
            messages, tools, kwargs = escaper.escape(messages), escaper.escape(tools), escaper.escape(kwargs)
        context = {
            **kwargs,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
        }
        token = _deadline.set(time.monotonic() + MAX_SECONDS)
        built = _budget.set([0])
        chunks: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(context):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS} characters")
                _check_deadline()
                chunks.append(chunk)
        except TemplateError:
            raise
        except SecurityError as e:
            raise TemplateError(f"chat template attempted an unsafe operation: {e}") from e
        except Exception as e:  # a broken template is a bad request, whatever it tripped over
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        finally:
            _deadline.reset(token)
            _budget.reset(built)
        text = "".join(chunks)
        return text if escaper is None else escaper.restore(text)

    def _normalize(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if not isinstance(messages, Sequence) or isinstance(messages, str):
            raise InvalidRequestError("messages must be a list of message objects", "messages")
        out = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise InvalidRequestError(
                    "each message must be an object with a role and content", "messages"
                )
            message = dict(message)
            if isinstance(message.get("content"), list) and not self._keeps_parts:
                message["content"] = _text_of(message["content"])
            out.append(message)
        return out
