"""Text <-> token ids for Llama-family models, and streaming detokenization.

Owns building a tokenizer from GGUF metadata (byte-level BPE through `tokenizers`,
SentencePiece through `sentencepiece`) or from a Hugging Face folder, special tokens (bos, the
end-of-generation set, special tokens written in a prompt), and `IncrementalDetokenizer`.
Decoding goes through one table of bytes per token, so `decode` and the streaming detokenizer
agree byte for byte. Chat templates live in `chat_template.py`, not here.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from llama_jax.errors import ModelLoadError

log = logging.getLogger(__name__)

# GGUF `tokenizer.ggml.token_type` values; SentencePiece numbers its piece types the same way.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn although the file does not name them eos (llama.cpp's EOG list).
_END_OF_TURN = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "_<EOT>"}
)

# Pre-tokenizer split regexes, as llama.cpp's llama-vocab.cpp applies them per `tokenizer.ggml.pre`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre -> (split regex, split every digit first, ignore_merges (whole words in the vocab win), add bos)
_PRE = {
    "default": (_GPT2, False, False, False),
    "gpt2": (_GPT2, False, False, False),
    **{
        name: (_GPT2, True, False, False)
        for name in ("smollm", "starcoder", "refact", "codeshell", "minerva")
    },
    **{
        name: (_LLAMA3, False, True, True)
        for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3")
    },
    **{name: (_QWEN2, False, False, False) for name in ("qwen2", "deepseek-r1-qwen")},
    "tekken": (_TEKKEN, False, True, True),
}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _byte_level_pieces(tokens: Sequence[str]) -> list[bytes]:
    """Bytes of byte-level tokens; a token outside the byte alphabet (an added token) is its UTF-8,
    as the `tokenizers` ByteLevel decoder does."""
    char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    to_latin1 = str.maketrans({c: chr(b) for c, b in char_to_byte.items()})
    foreign = re.compile("[^" + re.escape("".join(char_to_byte)) + "]")
    return [t.encode() if foreign.search(t) else t.translate(to_latin1).encode("latin-1") for t in tokens]


def _sentencepiece_pieces(tokens: Sequence[str], types: Sequence[int], path: object) -> list[bytes]:
    pieces = []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == BYTE:
            m = _BYTE_PIECE.fullmatch(tok)
            if m is None:
                raise ModelLoadError(path, f"token {i} {tok!r} is typed BYTE but is not written <0xHH>")
            pieces.append(bytes([int(m.group(1), 16)]))
        else:
            pieces.append(tok.replace("\u2581", " ").encode())
    return pieces


class _HFBackend:
    """Encoding by a `tokenizers.Tokenizer`; it finds the special tokens written in the text itself."""

    def __init__(self, tok: Any):
        self._tok = tok
        self._plain: Any = None  # a copy that leaves special tokens as text, built on first use
        self.special = {
            t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special and t.content
        }

    def encode(self, text: str, parse_special: bool) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: seconds for a large
        # text, during which a server's event loop could not run even with the call on a thread).
        if parse_special:
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if self._plain is None:
            from tokenizers import Tokenizer as HFTokenizer

            plain = HFTokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode_batch([text], add_special_tokens=False)[0].ids


class _SentencePieceBackend:
    """Encoding by SentencePiece, after cutting out the special tokens written in the text.

    Each stretch of text between special tokens is encoded on its own, so it gets SentencePiece's
    dummy-prefix space, as llama.cpp does after a special token.
    """

    def __init__(self, sp: Any, special: Mapping[str, int], added: Mapping[str, int]):
        self._sp = sp
        self._ids = {**special, **added}
        self.special = {name: i for name, i in special.items() if name}

        def alternation(names: Iterable[str]) -> re.Pattern[str] | None:
            names = sorted((name for name in names if name), key=len, reverse=True)
            return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

        self._split_special = alternation(self._ids)
        self._split_added = alternation(added)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        pattern = self._split_special if parse_special else self._split_added
        parts = pattern.split(text) if pattern else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:  # re.split puts the matched separators at odd positions
                ids.append(self._ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids


class Tokenizer:
    """Text <-> token ids for one model. Build it with `from_gguf_metadata` or `from_hf_folder`.

    `eos_ids` holds every id that ends generation: eos, then end-of-turn tokens such as
    `<|im_end|>` / `<|eot_id|>`. `special_ids` are the ids `decode(skip_special=True)` drops.
    """

    def __init__(
        self,
        backend: _HFBackend | _SentencePieceBackend,
        pieces: list[bytes],
        *,
        special_ids: Iterable[int],
        bos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
        strip_leading_space: bool,
    ):
        self._backend = backend
        self._pieces = pieces
        self.special_ids = frozenset(special_ids)
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        # SentencePiece writes a space before the first word; decoding the start of a text drops it.
        self._strip_leading_space = strip_leading_space

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_token(self) -> str:
        return "" if self.bos_id is None else self.token_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self.token_to_piece(self.eos_ids[0]) if self.eos_ids else ""

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The spellings `encode` turns into special token ids (what `ChatTemplate.render` must
        keep out of request text)."""
        return tuple(self._backend.special)

    def encode(self, text: str, add_bos: bool | None = None, *, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in it (`<|im_start|>`) become their ids
        unless `parse_special` is False, or unless they are in a `ChatPrompt`'s literal spans
        (request text). `add_bos` None means the model's own setting; bos is not added twice
        when the text already starts with it (a chat template that writes it)."""
        spans = getattr(text, "literal_spans", ())
        if parse_special and spans:
            ids = self._encode_around(str(text), spans)
        else:
            ids = self._backend.encode(str(text), parse_special)
        wanted = self.add_bos if add_bos is None else add_bos
        if wanted and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _encode_around(self, text: str, literal: Sequence[tuple[int, int]]) -> list[int]:
        """Special tokens outside the `literal` spans become their ids; the text between them is
        encoded without special parsing, one stretch at a time, as the backends themselves do
        after splitting at special tokens."""
        special = self._backend.special
        names = sorted(special, key=len, reverse=True)
        starts = {start for start, _ in literal}
        ids: list[int] = []
        pos = 0
        for m in re.finditer("|".join(map(re.escape, names)), text) if names else ():
            if m.start() in starts:
                continue
            if m.start() > pos:
                ids += self._backend.encode(text[pos : m.start()], False)
            ids.append(special[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._backend.encode(text[pos:], False)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True, *, continuation: bool = False) -> str:
        """The text of `ids`. Invalid UTF-8 becomes U+FFFD; ids outside the vocabulary decode to
        nothing. `continuation`: the ids follow earlier text, so SentencePiece's leading space stays."""
        chunks = []
        at_start = not continuation
        for token_id in ids:
            piece = self._piece(token_id, skip_special, at_start)
            if piece is not None:
                chunks.append(piece)
                at_start = False
        return b"".join(chunks).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a byte token may be part of a character)."""
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""

    def token_to_piece(self, token_id: int) -> str:
        """The text of one token on its own, leading space included (as llama.cpp's /tokenize shows it)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _piece(self, token_id: int, skip_special: bool, at_start: bool) -> bytes | None:
        """Bytes `token_id` adds to a decoded text, or None when it adds nothing (a dropped special
        token, an id outside the vocabulary)."""
        if not 0 <= token_id < len(self._pieces):
            return None
        special = token_id in self.special_ids
        if special and skip_special:
            return None
        piece = self._pieces[token_id]
        if at_start and self._strip_leading_space and not special and piece.startswith(b" "):
            piece = piece[1:]
        return piece

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def _from_built(
        cls,
        built: _Built,
        *,
        bos_id: int | None,
        ends: Iterable[int | None],
        add_bos: bool,
        chat_template: Any,
    ) -> Tokenizer:
        ends = [*ends, *(i for i in sorted(built.special) if built.tokens[i] in _END_OF_TURN)]
        eos_ids = [i for i in ends if i is not None]
        return cls(
            built.backend,
            built.pieces,
            special_ids=built.special | {i for i in (bos_id, *eos_ids[:1]) if i is not None},
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
            chat_template=chat_template if isinstance(chat_template, str) else None,
            strip_leading_space=built.strip_leading_space,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], path: object = "<gguf>") -> Tokenizer:
        """The tokenizer a GGUF file describes (`GGUFFile(path).metadata`)."""
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ModelLoadError(path, "no tokenizer.ggml.tokens (a list of strings) in the metadata")
        n = len(tokens)
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            types = [NORMAL] * n
        elif not isinstance(types, list) or len(types) != n:
            raise ModelLoadError(path, f"tokenizer.ggml.token_type does not have one entry per token ({n})")
        types = [t if t in (UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL for t in types]

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is not None and (not isinstance(value, int) or not 0 <= value < n):
                raise ModelLoadError(
                    path, f"tokenizer.ggml.{key} = {value!r} is not a token id (vocabulary of {n})"
                )
            return value

        model = meta.get("tokenizer.ggml.model")
        if model == "gpt2":
            built = _gguf_bpe(meta, tokens, types, path)
        elif model == "llama":
            built = _gguf_sentencepiece(meta, tokens, types, token_id("unknown_token_id"), path)
        else:
            raise ModelLoadError(path, f"unsupported tokenizer.ggml.model {model!r} (supported: gpt2, llama)")
        return cls._from_built(
            built,
            bos_id=token_id("bos_token_id"),
            ends=[token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id")],
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", built.add_bos)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_folder(cls, folder: str | Path) -> Tokenizer:
        """The tokenizer of a Hugging Face model folder: `tokenizer.json`, else `tokenizer.model`,
        with special tokens, bos/eos and the chat template from `tokenizer_config.json`,
        `special_tokens_map.json` and `generation_config.json` where present."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(folder, "not a folder")
        config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")
        if (folder / "tokenizer.json").is_file():
            built = _hf_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "tokenizer.model").is_file():
            built = _hf_sentencepiece(folder / "tokenizer.model", config)
        else:
            raise ModelLoadError(folder, "no tokenizer.json or tokenizer.model")
        ids = {token: i for i, token in enumerate(built.tokens)}

        def named(key: str) -> int | None:
            for name, source in (("tokenizer_config.json", config), ("special_tokens_map.json", token_map)):
                value = source.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if value:
                    if value not in ids:
                        raise ModelLoadError(folder / name, f"{key} {value!r} is not in the vocabulary")
                    return ids[value]
            return None

        def generation_ids(key: str) -> list[int]:
            value = generation.get(key)
            values = value if isinstance(value, list) else [] if value is None else [value]
            if not all(isinstance(v, int) and 0 <= v < len(built.pieces) for v in values):
                raise ModelLoadError(folder / "generation_config.json", f"{key} {value!r} is not a token id")
            return values

        bos_id = named("bos_token")
        if bos_id is None:
            bos_id = next(iter(generation_ids("bos_token_id")), None)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = by_name.get("default", next(iter(by_name.values()), None))
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls._from_built(
            built,
            bos_id=bos_id,
            ends=[named("eos_token"), *generation_ids("eos_token_id")],
            add_bos=bool(config.get("add_bos_token", built.add_bos)),
            chat_template=template,
        )


class _Built(NamedTuple):
    """What a tokenizer source yields, before bos/eos and the template are attached."""

    backend: _HFBackend | _SentencePieceBackend
    tokens: list[str]  # as the vocabulary spells them
    pieces: list[bytes]  # what each decodes to
    special: set[int]
    strip_leading_space: bool
    add_bos: bool  # the default when the source does not say


def _gguf_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int], path: object) -> _Built:
    from tokenizers import AddedToken, Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise ModelLoadError(path, "a gpt2 tokenizer needs tokenizer.ggml.merges (a list of strings)")
    pairs = [tuple(m.split(" ")) for m in merges]
    for merge, pair in zip(merges, pairs, strict=True):
        if len(pair) != 2:
            raise ModelLoadError(path, f"merge {merge!r} is not two tokens separated by one space")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        log.warning("%s: unknown tokenizer.ggml.pre %r; splitting text as GPT-2 does", path, pre)
    split, digits, ignore_merges, add_bos = _PRE.get(pre, _PRE["default"])
    try:
        tok = HFTokenizer(
            models.BPE({t: i for i, t in enumerate(tokens)}, pairs, ignore_merges=ignore_merges)
        )
    except Exception as e:  # tokenizers reports a merge of unknown tokens as a plain Exception
        raise ModelLoadError(path, f"cannot build the BPE tokenizer: {e}") from e
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    steps += [
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED
        ]
    )
    special = {i for i, k in enumerate(types) if k in (CONTROL, UNKNOWN)}
    return _Built(_HFBackend(tok), tokens, _byte_level_pieces(tokens), special, False, add_bos)


def _gguf_sentencepiece(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], unk_id: int | None, path: object
) -> _Built:
    """A SentencePiece BPE model rebuilt from the GGUF vocabulary, as llama.cpp's SPM tokenizer reads it."""
    import sentencepiece as spm

    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise ModelLoadError(
            path, f"a llama tokenizer needs tokenizer.ggml.scores, one per token ({len(tokens)})"
        )
    types = list(types)
    if UNKNOWN not in types and unk_id is not None:
        types[unk_id] = UNKNOWN
    if types.count(UNKNOWN) != 1:
        raise ModelLoadError(
            path, f"a llama tokenizer needs exactly one UNKNOWN token, found {types.count(UNKNOWN)}"
        )
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(_sentencepiece_model_proto(tokens, scores, types, add_space_prefix))
    except (RuntimeError, OSError, TypeError, struct.error) as e:
        raise ModelLoadError(path, f"SentencePiece rejects the vocabulary: {e}") from e
    special = {i for i, k in enumerate(types) if k in (CONTROL, UNKNOWN)}
    backend = _SentencePieceBackend(sp, {tokens[i]: i for i in special}, {})
    return _Built(
        backend, tokens, _sentencepiece_pieces(tokens, types, path), special, add_space_prefix, True
    )


def _sentencepiece_model_proto(
    tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool
) -> bytes:
    """A serialized sentencepiece `ModelProto` (BPE, identity normalizer), written directly in the
    protobuf wire format: the `sentencepiece_model_pb2` module sentencepiece ships only imports
    with the protobuf runtime it was generated for. Field numbers are sentencepiece_model.proto's."""

    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1  # a negative int32 is written as ten bytes of two's complement
        out = bytearray()
        while n > 0x7F:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        out.append(n)
        return bytes(out)

    def number(field: int, n: int) -> bytes:
        return varint(field << 3) + varint(n)

    def message(field: int, data: bytes) -> bytes:
        return varint(field << 3 | 2) + varint(len(data)) + data

    pieces = b"".join(
        message(1, message(1, t.encode()) + varint(2 << 3 | 5) + struct.pack("<f", s) + number(3, k))
        for t, s, k in zip(tokens, scores, types, strict=True)
    )
    trainer = (
        number(3, 2) + number(4, len(tokens)) + number(35, BYTE in types) + number(40, types.index(UNKNOWN))
    )
    normalizer = message(1, b"identity") + number(3, add_space_prefix) + number(4, False) + number(5, True)
    return pieces + message(2, trainer) + message(3, normalizer)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file's content, {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(path, f"unreadable JSON: {e}") from e
    if not isinstance(value, dict):
        raise ModelLoadError(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def _decoder_steps(decoder: Any) -> list[dict[str, Any]]:
    """The steps of a tokenizer.json decoder, Sequences flattened."""
    if not isinstance(decoder, dict):
        return []
    if decoder.get("type") == "Sequence":
        return [step for d in decoder.get("decoders", []) for step in _decoder_steps(d)]
    return [decoder]


def _adds_bos(post: Any) -> bool:
    """Whether a tokenizer.json post-processor puts a special token before the text."""
    if not isinstance(post, dict):
        return False
    if post.get("type") == "Sequence":
        return any(_adds_bos(p) for p in post.get("processors", []))
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]


def _hf_tokenizer_json(path: Path) -> _Built:
    from tokenizers import Tokenizer as HFTokenizer

    spec = _read_json(path)
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for a file it cannot use
        raise ModelLoadError(path, f"unreadable tokenizer.json: {e}") from e
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    steps = _decoder_steps(spec.get("decoder"))
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:
        pieces, strip = _byte_level_pieces(tokens), False
    elif kinds and not kinds - {"Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"}:
        # SentencePiece style: "▁" is a space, <0xHH> a byte, and the first word's space goes.
        types = [BYTE if "ByteFallback" in kinds and _BYTE_PIECE.fullmatch(t) else NORMAL for t in tokens]
        pieces = _sentencepiece_pieces(tokens, types, path)
        strip = any(
            (s.get("type") == "Strip" and s.get("start", 0) > 0)
            or (
                s.get("type") == "Metaspace"
                and s.get("prepend_scheme", "always") != "never"
                and s.get("add_prefix_space", True)
            )
            for s in steps
        )
    else:
        raise ModelLoadError(
            path,
            f"unsupported decoder steps {sorted(kinds)} (supported: ByteLevel; Metaspace, Replace, ByteFallback, Fuse, Strip)",
        )
    special = {t["id"] for t in spec.get("added_tokens", []) if isinstance(t, dict) and t.get("special")}
    return _Built(_HFBackend(tok), tokens, pieces, special, strip, _adds_bos(spec.get("post_processor")))


def _hf_sentencepiece(path: Path, config: Mapping[str, Any]) -> _Built:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (RuntimeError, OSError) as e:
        raise ModelLoadError(path, f"unreadable SentencePiece model: {e}") from e
    n = sp.GetPieceSize()
    tokens = [sp.IdToPiece(i) for i in range(n)]
    kinds = [
        BYTE if sp.IsByte(i) else CONTROL if sp.IsControl(i) else UNKNOWN if sp.IsUnknown(i) else NORMAL
        for i in range(n)
    ]
    pieces = _sentencepiece_pieces(tokens, kinds, path)
    special = {tokens[i]: i for i, k in enumerate(kinds) if k in (CONTROL, UNKNOWN)}
    added: dict[str, int] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if not isinstance(entry, dict) or not str(key).isdigit() or not isinstance(entry.get("content"), str):
            raise ModelLoadError(
                path.parent / "tokenizer_config.json", f"bad added_tokens_decoder entry {key!r}"
            )
        i, content = int(key), entry["content"]
        if i >= len(tokens):  # a token added after training, beyond the SentencePiece vocabulary
            tokens.extend([""] * (i + 1 - len(tokens)))
            pieces.extend([b""] * (i + 1 - len(pieces)))
            tokens[i], pieces[i] = content, content.encode()
        (special if entry.get("special") else added)[content] = i
    # SentencePiece drops the first piece's "▁" when decoding if its normalizer adds a dummy
    # prefix (or trims whitespace); ask it rather than parse the normalizer spec.
    lead = next(
        (i for i, t in enumerate(tokens[:n]) if kinds[i] == NORMAL and t.startswith("\u2581") and len(t) > 1),
        None,
    )
    strip = lead is not None and not sp.DecodeIds([lead]).startswith(" ")
    backend = _SentencePieceBackend(sp, special, added)
    return _Built(backend, tokens, pieces, set(special.values()), strip, True)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, one `add` per token, O(1) each.

    A delta never ends in half a UTF-8 character (a byte token such as <0xE2>, or a byte-level
    piece that splits an emoji, is held until the character completes), and all deltas plus
    `flush()` equal `tokenizer.decode(all_ids, skip_special, continuation=...)` exactly.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, *, continuation: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._at_start = not continuation
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes (often all of its piece, sometimes "")."""
        piece = self._tokenizer._piece(token_id, self._skip_special, self._at_start)
        if piece is None:
            return ""
        self._at_start = False
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """What is still held at the end: an unfinished character becomes U+FFFD, as in `decode`."""
        return self._utf8.decode(b"", final=True)
