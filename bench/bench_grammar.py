"""Constrained-decoding grammar libraries on the default model's own tokenizer.

    python bench/bench_grammar.py [--model ALIAS_OR_PATH] [--repeats 3] [--libs llguidance,outlines-core,xgrammar]

For each of llguidance, outlines-core and xgrammar (whichever is installed; none is a
dependency of llama-jax) this builds the library's tokenizer object from our `Tokenizer`'s
per-token byte strings and eos ids, then measures:

- compile time of (a) any JSON object (`{"type": "object"}`) and (b) a JSON schema with nested
  objects, arrays, enums, required fields and string patterns (median of --repeats, caches off;
  llguidance builds its lexer lazily, so part of its cost shows in the first masks instead);
- mask time per token: a valid instance of (b) is tokenized with our tokenizer and fed token by
  token, the full-vocabulary allowed mask being computed before each token as a serving engine
  would (int32 bitmask [ceil(V/32)] written in place into a numpy array), for a 1st request on the
  freshly compiled grammar and a 2nd request reusing it;
- whether the library accepts our tokenization (each token's bit set in the mask before it, and
  consumed), EOS allowed at the end, rollback giving back the same mask, and the error raised
  for an invalid schema.

Prints markdown tables. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

ANY_OBJECT = {"type": "object"}

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"type": "string", "enum": ["FR", "DE", "US", "JP"]},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}},
        "scores": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "subject": {"type": "string", "enum": ["math", "physics", "history", "art"]},
                    "value": {"type": "number"},
                    "passed": {"type": "boolean"},
                },
                "required": ["subject", "value", "passed"],
                "additionalProperties": False,
            },
        },
        "notes": {"type": ["string", "null"]},
    },
    "required": ["id", "name", "role", "address", "tags", "scores"],
    "additionalProperties": False,
}

INVALID_SCHEMA = {"type": "object", "properties": {"x": {"type": "no-such-type"}}}

REGEX = r"[A-Z]{3}-[0-9]{4}( [a-z]+)*"
LARK = 'start: "SELECT " column (", " column)* " FROM " NAME\ncolumn: NAME | "*"\nNAME: /[a-z_]+/\n'


def instance() -> dict:
    """A valid instance of SCHEMA, keys in schema order (outlines-core requires that order)."""
    subjects = ["math", "physics", "history", "art"]
    return {
        "id": "ABC-1234",
        "name": "Ada Lovelace, Countess of Lovelace",
        "age": 36,
        "role": "editor",
        "active": True,
        "address": {"street": "12 St James's Square", "city": "London", "zip": "01234", "country": "FR"},
        "tags": ["mathematician", "writer", "analytical engine", "notes", "poetical science"],
        "scores": [
            {"subject": subjects[i % 4], "value": round(55.5 + 3.25 * i, 2), "passed": i % 3 != 0}
            for i in range(14)
        ],
        "notes": "First published algorithm intended for a machine; translated Menabrea's memoir.",
    }


def load_tokenizer(model: str | None):
    from llama_jax.gguf import GGUFFile
    from llama_jax.tokenizer import Tokenizer
    from llama_jax.weights import resolve_model_path

    _, path = resolve_model_path(model)
    if path.is_dir():
        return Tokenizer.from_hf_folder(path)
    return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, path)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def bit(mask: np.ndarray, token: int) -> bool:
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


def popcount(mask: np.ndarray, vocab: int) -> int:
    return int(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].sum())


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(last result, median seconds) of `repeats` calls."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return result, statistics.median(times)


def short_error(e: BaseException | str) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    text = " ".join(text.split()).replace("|", "/")
    return text[:110] + ("…" if len(text) > 110 else "")


# ---- adapters: one small class per library, same interface ---------------------------------------
#
# build(pieces, eos_ids, special_ids, encode) -> tokenizer object (timed)
# compile(schema_dict) -> compiled grammar; matcher(compiled) -> matcher
# fill(m, mask) writes the int32 bitmask; consume(m, t) -> bool; accepting(m); rollback(m, n)
# compile_regex / compile_lark -> compiled or raise; invalid(schema) -> error text or None


class LLGuidance:
    name = "llguidance"
    dist = "llguidance"
    mask_form = "int32 bitmask [ceil(V/32)], written in place (numpy ptr via `llguidance.numpy.fill_next_token_bitmask`)"

    def __init__(self):
        import llguidance
        import llguidance.numpy

        self.llg = llguidance
        self.fill_np = llguidance.numpy.fill_next_token_bitmask

    def build(self, pieces, eos_ids, special_ids, encode, bos_id):
        class Wrapped:  # what llguidance.TokenizerWrapper reads off a tokenizer
            def __init__(self):
                self.tokens = pieces
                self.eos_token_id = eos_ids[0]
                self.bos_token_id = bos_id
                self.special_token_ids = sorted(special_ids)

            def __call__(self, text: bytes | str) -> list[int]:
                return encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        self.tok = self.llg.LLTokenizer(self.llg.TokenizerWrapper(Wrapped()), eos_token=list(eos_ids))
        return self.tok

    def _matcher(self, grammar: str):
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def compile(self, schema):
        return self._matcher(self.llg.LLMatcher.grammar_from_json_schema(schema))

    def matcher(self, compiled):
        return compiled.deep_copy()  # a compiled LLMatcher is the template; copies are cheap

    def fill(self, m, mask):
        self.fill_np(m, mask[None, :])

    def consume(self, m, t):
        return m.consume_token(t)

    def accepting(self, m):
        return m.is_accepting()

    def stopped(self, m):
        return m.is_stopped()

    def rollback(self, m, n):
        return m.rollback(n)

    def compile_regex(self, regex):
        return self._matcher(self.llg.LLMatcher.grammar_from_regex(regex))

    def compile_lark(self, lark):
        return self._matcher(self.llg.LLMatcher.grammar_from_lark(lark))

    def invalid(self, schema):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        return (
            f"no raise; m.is_error()={m.is_error()}, m.get_error()= {m.get_error()!r}"
            if m.is_error()
            else None
        )


class XGrammar:
    name = "xgrammar"
    dist = "xgrammar"
    mask_form = "int32 bitmask [B, ceil(V/32)], written in place (any DLPack CPU array: numpy or torch)"

    def __init__(self):
        import xgrammar

        self.xgr = xgrammar

    def build(self, pieces, eos_ids, special_ids, encode, bos_id):
        # Special tokens as b"" (xgrammar treats empty tokens as special: never allowed in text).
        vocab = [b"" if i in special_ids else p for i, p in enumerate(pieces)]
        self.info = self.xgr.TokenizerInfo(
            vocab, self.xgr.VocabType.RAW, vocab_size=len(pieces), stop_token_ids=list(eos_ids)
        )
        self.compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        return self.info

    def compile(self, schema):
        return self.compiler.compile_json_schema(schema)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, mask):
        m.fill_next_token_bitmask(mask[None, :])

    def consume(self, m, t):
        return m.accept_token(t)

    def accepting(self, m):
        return m.is_completed()

    def stopped(self, m):
        return m.is_terminated()

    def rollback(self, m, n):
        m.rollback(n)
        return True

    def compile_regex(self, regex):
        return self.compiler.compile_regex(regex)

    def compile_lark(self, lark):
        return self.compiler.compile_lark(lark)

    def invalid(self, schema):
        try:
            self.compiler.compile_json_schema(schema)
        except Exception as e:  # noqa: BLE001 - reporting what it raises
            return short_error(e)
        return None


class OutlinesCore:
    name = "outlines-core"
    dist = "outlines-core"
    mask_form = "int32 bitmask [ceil(V/32)], written in place (`Guide.write_mask_into(ptr, numel, 4)`)"

    def __init__(self):
        import outlines_core

        self.oc = outlines_core

    def build(self, pieces, eos_ids, special_ids, encode, bos_id):
        # Vocabulary(eos_id, {token bytes: [ids]}): special tokens (eos included) are left out.
        vmap: dict[bytes, list[int]] = {}
        for i, p in enumerate(pieces):
            if i not in special_ids and p:
                vmap.setdefault(p, []).append(i)
        self.vocab = self.oc.Vocabulary(eos_ids[0], vmap)
        self.eos = eos_ids[0]
        return self.vocab

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled, max_rollback=64)

    def fill(self, m, mask):
        m.write_mask_into(mask.ctypes.data, mask.size, 4)

    def consume(self, m, t):
        try:
            m.advance(t, return_tokens=False)
        except Exception:  # noqa: BLE001 - a token the index has no transition for
            return False
        return True

    def accepting(self, m):
        return m.is_finished()

    def stopped(self, m):
        return m.is_finished()  # a Guide has no stopped state: advance(eos) raises; engines stop on EOS

    def rollback(self, m, n):
        m.rollback_state(n)
        return True

    def compile_regex(self, regex):
        return self.oc.Index(regex, self.vocab)

    def compile_lark(self, lark):
        raise NotImplementedError("regex / JSON schema only (no CFG)")

    def invalid(self, schema):
        try:
            self.compile(schema)
        except Exception as e:  # noqa: BLE001 - reporting what it raises
            return short_error(e)
        return None


ADAPTERS = {"llguidance": LLGuidance, "outlines-core": OutlinesCore, "xgrammar": XGrammar}


def run_sequence(lib, compiled, tokens: list[int], vocab: int, eos_ids, special_ids, rollback_n: int) -> dict:
    """Feed `tokens` one by one, a full mask before each; then EOS; then a rollback check."""
    leak_ids = sorted(set(special_ids) - set(eos_ids))  # control tokens that must never be allowed
    leaks = 0
    words = (vocab + 31) // 32
    mask = np.zeros(words, dtype=np.int32)
    t = time.perf_counter()
    m = lib.matcher(compiled)
    new_matcher = time.perf_counter() - t
    mask_times, consume_times, saved = [], [], []
    accepted = allowed = 0
    first_bad = None
    allowed_at_start = None
    for step, token in enumerate(tokens):
        t0 = time.perf_counter()
        lib.fill(m, mask)
        t1 = time.perf_counter()
        if step == 0:
            allowed_at_start = popcount(mask, vocab)
        saved.append(mask.copy())
        leaks += any(bit(mask, s) for s in leak_ids)
        ok_bit = bit(mask, token)
        allowed += ok_bit
        t2 = time.perf_counter()
        ok = lib.consume(m, token)
        t3 = time.perf_counter()
        mask_times.append(t1 - t0)
        consume_times.append(t3 - t2)
        if not (ok and ok_bit):
            first_bad = first_bad or f"step {step} token {token} (bit {ok_bit}, consumed {ok})"
            if not ok:
                break
        accepted += ok
    result = {
        "steps": len(mask_times),
        "new_matcher": new_matcher,
        "mask": mask_times,
        "consume": consume_times,
        "accepted": accepted,
        "allowed": allowed,
        "first_bad": first_bad,
        "allowed_at_start": allowed_at_start,
        "n": len(tokens),
        "leaks": leaks,
    }
    if accepted < len(tokens):
        return result
    lib.fill(m, mask)
    result["accepting"] = lib.accepting(m)
    result["eos_allowed"] = [bit(mask, e) for e in eos_ids]
    result["allowed_at_end"] = popcount(mask, vocab)
    # rollback: undo the last `rollback_n` tokens, the mask must equal the one computed then
    try:
        lib.rollback(m, rollback_n)
        lib.fill(m, mask)
        same = bool(np.array_equal(mask, saved[-rollback_n]))
        redo = all(lib.consume(m, tk) for tk in tokens[-rollback_n:])
        result["rollback"] = "ok" if same and redo and lib.accepting(m) else f"mask same={same}, redo={redo}"
    except Exception as e:  # noqa: BLE001
        result["rollback"] = short_error(e)
    result["eos_consumed"] = lib.consume(m, eos_ids[0])
    result["stopped"] = lib.stopped(m)
    return result


def stats(xs: list[float]) -> tuple[float, float, float]:
    a = np.asarray(xs)
    return float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99))


def bench_library(name: str, tok, repeats: int, tokens: list[int], rollback_n: int) -> dict:
    out: dict[str, Any] = {"name": name}
    try:
        lib = ADAPTERS[name]()
    except Exception as e:  # noqa: BLE001 - not installed / does not import
        out["error"] = short_error(e)
        return out
    out["version"] = importlib.metadata.version(lib.dist)
    out["mask_form"] = lib.mask_form
    vocab = tok.vocab_size
    pieces = [tok.token_bytes(i) for i in range(vocab)]
    eos_ids = list(tok.eos_ids)
    special = set(tok.special_ids)
    t = time.perf_counter()
    lib.build(pieces, eos_ids, special, lambda s: tok.encode(s, add_bos=False), tok.bos_id)
    out["tokenizer_s"] = time.perf_counter() - t

    for key, schema in (("any", ANY_OBJECT), ("schema", SCHEMA)):
        try:
            compiled, secs = timed(lambda schema=schema: lib.compile(copy.deepcopy(schema)), repeats)
            out[f"compile_{key}"] = secs
            # 1st request on a freshly compiled grammar, then a 2nd request reusing it (a grammar cache)
            out[f"run_{key}"] = run_sequence(lib, compiled, tokens, vocab, eos_ids, special, rollback_n)
            out[f"run_{key}_warm"] = run_sequence(lib, compiled, tokens, vocab, eos_ids, special, rollback_n)
        except Exception as e:  # noqa: BLE001
            out[f"compile_{key}_error"] = short_error(e)
            traceback.print_exc()

    for key, fn, arg in (("regex", lib.compile_regex, REGEX), ("lark", lib.compile_lark, LARK)):
        try:
            _, secs = timed(lambda fn=fn, arg=arg: fn(arg), 1)
            out[key] = f"yes ({ms(secs)} ms)"
        except Exception as e:  # noqa: BLE001
            out[key] = "no: " + short_error(e)
    try:
        err = lib.invalid(INVALID_SCHEMA)
        out["invalid"] = err or "accepted without error"
    except Exception as e:  # noqa: BLE001
        out["invalid"] = "raised outside the usual path: " + short_error(e)
    return out


def print_tables(results: list[dict], tok, tokens: list[int], repeats: int) -> None:
    print(
        f"\nTokenizer: vocab {tok.vocab_size}, eos ids {list(tok.eos_ids)}, "
        f"{len(tok.special_ids)} special tokens; instance of (b): {len(tokens)} tokens; "
        f"compile = median of {repeats}, caches off.\n"
    )
    print(
        "| library | version | tokenizer object (ms) | compile (a) any object (ms) | compile (b) schema (ms) | mask form |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | not available: {r['error']} | | | | |")
            continue
        ca = ms(r["compile_any"]) if "compile_any" in r else "error: " + r.get("compile_any_error", "")
        cb = (
            ms(r["compile_schema"])
            if "compile_schema" in r
            else "error: " + r.get("compile_schema_error", "")
        )
        print(f"| {r['name']} | {r['version']} | {ms(r['tokenizer_s'])} | {ca} | {cb} | {r['mask_form']} |")

    print(
        "\n| library | grammar | steps | new matcher (µs) | first mask (µs) | mask mean / p50 / p99 (µs) "
        "| consume mean (µs) | our tokens accepted | allowed at step 0 | accepting at end, EOS allowed "
        "| rollback 10 | EOS consumed → stopped | steps allowing a control token |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for key, label in (
            ("any", "(a) any object, 1st request"),
            ("any_warm", "(a) any object, 2nd request"),
            ("schema", "(b) schema, 1st request"),
            ("schema_warm", "(b) schema, 2nd request"),
        ):
            run = r.get(f"run_{key}")
            if run is None:
                continue
            mean, p50, p99 = stats(run["mask"])
            cmean = statistics.fmean(run["consume"])
            acc = f"{run['accepted']}/{run['n']}" + (
                f" (first failure: {run['first_bad']})" if run["first_bad"] else ""
            )
            if "accepting" in run:
                end = f"{run['accepting']}, {run['eos_allowed']} ({run['allowed_at_end']} allowed)"
                tail = f"{run['eos_consumed']} → {run['stopped']}"
                rb = run["rollback"]
            else:
                end = tail = rb = "n/a"
            print(
                f"| {r['name']} | {label} | {run['steps']} | {us(run['new_matcher'])} | {us(run['mask'][0])} "
                f"| {us(mean)} / {us(p50)} / {us(p99)} | {us(cmean)} | {acc} | {run['allowed_at_start']} "
                f"| {end} | {rb} | {tail} | {run['leaks']} |"
            )

    print('\n| library | regex grammar | lark / CFG grammar | invalid schema `{"type": "no-such-type"}` |')
    print("|---|---|---|---|")
    for r in results:
        if "error" not in r:
            print(f"| {r['name']} | {r['regex']} | {r['lark']} | {r['invalid']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="alias, GGUF file or HF folder (default: the default model)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="compile repeats (median)")
    ap.add_argument(
        "--libs", default=",".join(ADAPTERS), help="comma-separated subset of " + ", ".join(ADAPTERS)
    )
    ap.add_argument("--rollback", type=int, default=10, help="tokens to roll back in the rollback check")
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    text = json.dumps(instance())
    tokens = tok.encode(text, add_bos=False)
    assert tok.decode(tokens) == text
    results = []
    for name in args.libs.split(","):
        t = time.perf_counter()
        results.append(bench_library(name.strip(), tok, args.repeats, tokens, args.rollback))
        print(f"# {name}: {time.perf_counter() - t:.1f} s", flush=True)
    print_tables(results, tok, tokens, args.repeats)


if __name__ == "__main__":
    main()
