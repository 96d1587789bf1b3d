"""Constrained decoding: grammars that decide, token by token, what a request may generate.

A `Grammar` is a request's constraint as plain data (a JSON schema, any JSON object, a Lark
or GBNF grammar, a regex or a list of choices). The engine's `GrammarCompiler` turns it into a `Matcher` per request, on
the caller's thread, so an invalid grammar is an `InvalidRequestError` before any device work.
Before each step the engine asks the matchers of its constrained slots for their allowed-token
bitmasks (`[W]` int32, the layout `sampling.apply_mask` reads on device), and after each
sampled token advances them. Unconstrained requests have no matcher and cost nothing.

The grammar engine is llguidance: an Earley parser over lazily built lexer automata, which
computes a 49k-token mask in tens of microseconds on this machine and compiles a JSON schema
in milliseconds (`bench/bench_grammar.py` measures it against outlines-core and xgrammar).

A grammar is untrusted input and its masks are computed on the engine thread, so its cost is
bounded twice: llguidance's own limits (`LIMITS`: lexer fuel, Earley items, grammar size), and
a time budget measured when it is compiled. Compiling walks the shortest way to complete it,
a mask per step; a grammar whose compile and walk take longer than `MAX_COMPILE_SECONDS`, or
whose every mask after the first takes longer than `MAX_MASK_SECONDS` (`"pattern":
"^(x{300}){300}$"` costs ~35 ms a mask on a 49k vocabulary), is refused with an
`InvalidRequestError` naming the request field it came from (`Grammar.param`), and so is the
same grammar again. Sources are capped in size (`MAX_GRAMMAR_CHARS`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import llguidance
import llguidance.numpy
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark

from llama_jax.errors import InvalidRequestError
from llama_jax.sampling import mask_words
from llama_jax.tokenizer import Tokenizer

# JSON as people and small models write it: one space after ',' and ':', no free whitespace
# (flexible whitespace lets a small model pad an object with newlines until max_tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE = 64  # compiled grammars kept per compiler (requests copy them)
_WHOLE_LIMIT = 256  # longest shortest-output searched for when a grammar is compiled
MAX_GRAMMAR_CHARS = 65_536  # a JSON schema (as JSON text), Lark grammar or regex
MAX_COMPILE_SECONDS = 1.0  # compile, first mask and the walk to the shortest complete output
MAX_MASK_SECONDS = 0.005  # the fastest mask of that walk after the first (the first builds the lexer)
_PROBED_MASKS = 3  # masks of the walk timed against MAX_MASK_SECONDS
# Tighter than llguidance's defaults (fuel 1M initial / 200k per step, 50k Earley items, 250k
# lexer states, 500k grammar symbols): a step runs out of fuel in a few milliseconds.
LIMITS = llguidance.LLParserLimits(
    initial_lexer_fuel=200_000,
    step_lexer_fuel=50_000,
    step_max_items=20_000,
    max_lexer_states=50_000,
    max_grammar_size=100_000,
    verbose_errors=False,
)
_CLOSERS = [c.encode() for c in ('""', '"}}', '"}', '"]', '"', "}}", "}", "]", ",", "0", "null", "[]", "{}")]


@dataclasses.dataclass(frozen=True)
class Grammar:
    """What a constrained request may generate. `source`: the JSON schema (as JSON text), the
    Lark or GBNF grammar, the regex (matched whole) or the choices (a JSON list of strings);
    empty for `json_object`."""

    kind: Literal["json_schema", "json_object", "lark", "gbnf", "regex", "choice"]
    source: str = ""
    param: str | None = None  # the request field it came from; None: response_format or grammar

    def __post_init__(self):
        if len(self.source) > MAX_GRAMMAR_CHARS:
            what = "JSON schema" if self.kind == "json_schema" else self.kind
            raise InvalidRequestError(
                f"the {what} is {len(self.source)} characters long (limit {MAX_GRAMMAR_CHARS})",
                param=_param(self),
            )

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, param: str | None = None) -> Grammar:
        """Objects with `properties` and no `additionalProperties` are closed, as in OpenAI's
        strict mode (small models otherwise invent extra keys); say `true` to allow them."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(
                    f"invalid JSON schema: {e}", param=param or "response_format"
                ) from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("a JSON schema must be an object", param=param or "response_format")
        return cls("json_schema", json.dumps(closed_objects(schema)), param)

    @classmethod
    def json_object(cls, param: str | None = None) -> Grammar:
        return cls("json_object", "", param)

    @classmethod
    def lark(cls, grammar: str, param: str | None = None) -> Grammar:
        return cls("lark", grammar, param)

    @classmethod
    def gbnf(cls, grammar: str, param: str | None = None) -> Grammar:
        """llama.cpp's grammar format (`root ::= ...`), converted to Lark by llguidance."""
        return cls("gbnf", grammar, param)

    @classmethod
    def cfg(cls, grammar: str, param: str | None = None) -> Grammar:
        """A Lark grammar (it has a `start:` rule or a `%llguidance` line), else GBNF: what
        vLLM's `grammar` field takes."""
        return cls("lark" if is_lark_syntax(grammar) else "gbnf", grammar, param)

    @classmethod
    def regex(cls, pattern: str, param: str | None = None) -> Grammar:
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, options: Sequence[str], param: str | None = None) -> Grammar:
        """Exactly one of `options`."""
        if not options:
            raise InvalidRequestError("choice needs at least one option", param=param or "grammar")
        return cls("choice", json.dumps(list(options)), param)

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> Grammar | None:
        """OpenAI's `response_format`: {"type": "text"} (None), {"type": "json_object"}, or
        {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (always enforced)."""
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, Mapping) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind != "json_schema":
            raise InvalidRequestError(
                f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                param="response_format.type",
            )
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise InvalidRequestError(
                "response_format.json_schema must be an object with a name and a schema",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, Mapping):
            raise InvalidRequestError(
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format.json_schema.schema",
            )
        return cls.json_schema(dict(schema))

    def to_llguidance(self) -> str:
        """The grammar in llguidance's input format."""
        try:
            if self.kind == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=JSON_OPTIONS)
            if self.kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema(
                    {"type": "object"}, overrides=JSON_OPTIONS
                )
        except ValueError as e:
            raise InvalidRequestError(f"invalid JSON schema: {e}", param=_param(self)) from None
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        if self.kind == "gbnf":
            try:  # a recursive-descent parser in Python: deep nesting is a RecursionError
                return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(self.source))
            except Exception as e:  # noqa: BLE001 - whatever the converter trips over is the grammar's fault
                raise InvalidRequestError(f"invalid GBNF grammar: {e}", param=_param(self)) from None
        if self.kind == "choice":
            rule = " | ".join(json.dumps(c) for c in json.loads(self.source))
            return llguidance.LLMatcher.grammar_from_lark(f"start: {rule}")
        return llguidance.LLMatcher.grammar_from_regex(self.source)


def is_lark_syntax(text: str) -> bool:
    """llguidance's own test: a `start:` rule or a `%llguidance` line at the start of a line."""
    return re.search(r"(?m)^\s*(%llguidance\b|start\s*:)", text) is not None


_VALUES = frozenset({"const", "enum", "default", "examples"})  # JSON values, not schemas


def closed_objects(schema: Any) -> Any:
    """A copy of a JSON schema in which every object schema that lists `properties` and says
    nothing of `additionalProperties` forbids them."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _VALUES else closed_objects(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        # property names are keys, not schemas: keep them, close their schemas
        out["properties"] = {k: closed_objects(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int, whole_cost: int = 0):
        self._m = matcher
        self.words = words
        # Tokens the shortest complete output takes: what one more item of a repetition (another
        # tool call) may cost, so near the token limit a complete output ends instead.
        self.whole_cost = whole_cost

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the request should stop."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may also go on)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None

    def mask(self) -> np.ndarray:
        """The allowed-token bitmask [W] int32 for the next token."""
        out = np.empty((1, self.words), np.int32)
        llguidance.numpy.fill_next_token_bitmask(self._m, out)
        return out[0]

    def fill(self, out: np.ndarray, row: int) -> None:
        """Write the next token's bitmask into out[row] (out: [B, W] int32, C-contiguous)."""
        llguidance.numpy.fill_next_token_bitmask(self._m, out, row)

    def closing_path(self, limit: int, prefer: Sequence[int]) -> list[int] | None:
        """A short way to complete the grammar from here: tokens that end in an accepting state
        (found greedily on a copy: forced tokens, then `prefer` in order, then the lowest
        allowed id), or None if none is found within `limit` tokens."""
        return _walk(self._m.deep_copy(), self.words, limit, prefer)

    def advance(self, token: int) -> bool:
        """Consume a sampled token; False if the grammar rejects it (the matcher is then in error)."""
        return self._m.consume_token(token)


def _walk(
    m: llguidance.LLMatcher,
    words: int,
    limit: int,
    prefer: Sequence[int],
    mask_seconds: list[float] | None = None,
) -> list[int] | None:
    """`Matcher.closing_path`, advancing `m` itself. With `mask_seconds`, each mask's time is
    appended to it, and the walk gives up (None) as soon as the budget is known to be exceeded."""
    row = np.empty((1, words), np.int32)
    path: list[int] = []
    while not m.is_accepting():
        if len(path) >= limit:
            return None
        t0 = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(m, row)
        if mask_seconds is not None:
            mask_seconds.append(time.perf_counter() - t0)
            if m.is_error() or _over_budget(mask_seconds):
                return None
        bits = row[0]
        token = next((t for t in prefer if bits[t >> 5] >> (t & 31) & 1), None)
        if token is None:
            nonzero = np.flatnonzero(bits)
            if not len(nonzero):
                return None
            w = int(nonzero[0])
            token = w * 32 + (int(bits[w]) & -int(bits[w])).bit_length() - 1
        if not m.consume_token(token):
            return None
        path.append(token)
    return path


def _over_budget(seconds: list[float]) -> bool:
    """seconds: construction, then each mask. The first mask builds the lexer, so the per-mask
    limit is judged on the next `_PROBED_MASKS` (their fastest: a busy CPU only slows some)."""
    probed = seconds[2 : 2 + _PROBED_MASKS]
    slow = len(probed) == _PROBED_MASKS and min(probed) > MAX_MASK_SECONDS
    return slow or sum(seconds) > MAX_COMPILE_SECONDS


class GrammarCompiler:
    """Compiles grammars into matchers for one tokenizer. Thread-safe: requests are made on
    the callers' threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.words = mask_words(vocab_size)
        self._tokenizer = tokenizer
        self._ll: llguidance.LLTokenizer | None = None
        # A grammar -> its matcher and whole_cost, or the error that refused it.
        self._compiled: collections.OrderedDict[
            Grammar, tuple[llguidance.LLMatcher, int] | InvalidRequestError
        ] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary (built once, on first use: about a second)."""
        with self._lock:
            if self._ll is None:
                self._ll = _ll_tokenizer(self._tokenizer, self.vocab_size)
            return self._ll

    def matcher(self, grammar: Grammar) -> Matcher:
        ll = self.ll_tokenizer
        with self._lock:
            entry = self._compiled.get(grammar)
            if entry is not None:
                self._compiled.move_to_end(grammar)
        if entry is None:
            source = grammar.to_llguidance()  # a malformed schema is not cached: it costs nothing
            try:
                entry = self._compile(grammar, source, ll)
            except InvalidRequestError as e:
                entry = e
            with self._lock:
                self._compiled[grammar] = entry
                while len(self._compiled) > _CACHE:
                    self._compiled.popitem(last=False)
        if isinstance(entry, InvalidRequestError):
            raise InvalidRequestError(str(entry), param=entry.param)
        return Matcher(entry[0].deep_copy(), self.words, entry[1])

    def _compile(
        self, grammar: Grammar, source: str, ll: llguidance.LLTokenizer
    ) -> tuple[llguidance.LLMatcher, int]:
        """The base matcher and whole_cost of a grammar, within the limits and the time budget."""
        t0 = time.perf_counter()
        base = llguidance.LLMatcher(ll, source, log_level=0, limits=LIMITS)
        if base.is_error():
            raise InvalidRequestError(_describe(grammar, base.get_error()), param=_param(grammar))
        seconds = [time.perf_counter() - t0]
        probe = base.deep_copy()
        shortest = _walk(probe, self.words, _WHOLE_LIMIT, self.closers, seconds)
        problem = None
        if probe.is_error():  # out of llguidance's limits
            problem = probe.get_error().splitlines()[0]
        elif sum(seconds) > MAX_COMPILE_SECONDS:
            problem = f"compiling it took over {MAX_COMPILE_SECONDS:g} s"
        elif _over_budget(seconds):
            fastest = min(seconds[2 : 2 + _PROBED_MASKS])
            problem = (
                f"each token's allowed set takes {fastest * 1e3:.0f} ms to compute "
                f"(limit {MAX_MASK_SECONDS * 1e3:g} ms)"
            )
        if problem is not None:
            raise InvalidRequestError(f"{_what(grammar)} is too complex: {problem}", param=_param(grammar))
        return base, _WHOLE_LIMIT if shortest is None else len(shortest)

    @functools.cached_property
    def closers(self) -> tuple[int, ...]:
        """Tokens that end JSON strings, objects and arrays or are short values, the most
        closing first: what `Matcher.closing_path` tries before anything else."""
        ids = {}
        for t in range(min(self.vocab_size, self._tokenizer.vocab_size)):
            piece = self._tokenizer.token_bytes(t)
            if piece in _CLOSERS and t not in self._tokenizer.special_ids:
                ids.setdefault(piece, t)
        return tuple(ids[c] for c in _CLOSERS if c in ids)

    def mask_batch(self, matchers: list[tuple[Matcher, int]], out: np.ndarray) -> None:
        """Fill out[row] for each (matcher, row), in parallel across matchers."""
        if len(matchers) == 1:
            matchers[0][0].fill(out, matchers[0][1])
            return
        llguidance.numpy.fill_next_token_bitmask_par(_executor(), [(m._m, row) for m, row in matchers], out)


def _param(grammar: Grammar) -> str:
    if grammar.param:
        return grammar.param
    return "response_format" if grammar.kind.startswith("json") else "grammar"


_KINDS = {
    "json_schema": "JSON schema",
    "json_object": "JSON grammar",
    "lark": "Lark grammar",
    "gbnf": "GBNF grammar",
    "regex": "regex",
    "choice": "choice",
}


def _what(grammar: Grammar) -> str:
    if grammar.param == "tools":
        return "the grammar of the tools' parameters"
    return f"the {_KINDS[grammar.kind]}"


def _describe(grammar: Grammar, error: str) -> str:
    return f"invalid {_KINDS[grammar.kind]}: {error.strip()}"


_EXECUTOR: llguidance.LLExecutor | None = None


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


class _Vocabulary:
    """The duck-typed tokenizer llguidance's `TokenizerWrapper` reads: token bytes, specials
    (llguidance names them with a leading 0xFF byte, so text can never spell them), eos, and
    an encoder it uses to tokenize forced text."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(t for t in tokenizer.special_ids if t < vocab_size)
        tokens = []
        for t in range(vocab_size):
            piece = tokenizer.token_bytes(t)
            tokens.append(b"\xff" + piece if t in tokenizer.special_ids else piece)
        self.tokens = tokens

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False, parse_special=False)


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    vocab = _Vocabulary(tokenizer, vocab_size)
    eos = [t for t in tokenizer.eos_ids if t < vocab_size] or None
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=vocab_size, eos_token=eos)
