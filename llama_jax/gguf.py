"""Reading GGUF files (llama.cpp's format): metadata and dequantized tensors.

Owns the GGUF binary layout (a small, bounds-checked parser: the `gguf` package's reader
spends seconds building per-string views of a 100k-entry vocabulary) and the translation of
GGUF tensor names and layouts to the canonical Hugging Face names and `[out, in]` order used
by `weights.py`, including undoing llama.cpp's Q/K row permutation for interleaved RoPE.
4-bit tensors (Q4_0, Q4_1, Q4_K) can be read as their codes, scales and mins (`q4_rows`), and
Q8_0 tensors as their codes and scales (`q8_rows`);
other types are dequantized by the `gguf` package, one tensor at a time. Every failure is a `ModelLoadError`
naming the file; nothing is allocated beyond what the file's own bytes justify.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.errors import ModelLoadError
from llama_jax.quantize import Q4Rows, Q8Rows, pack_nibbles

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_SCALARS = {  # GGUF value type -> struct format
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8
_MAX_NESTING = 8  # arrays of arrays of ...

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
Q4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # read as 4-bit codes, scales and mins without dequantizing


def type_bits(name: str) -> int:
    """Bits per weight of a GGML type name: the number in it (Q5_K: 5, IQ4_XS: 4, BF16: 16)."""
    m = re.search(r"(\d+)", name)
    return int(m.group(1)) if m else 32


def q4_rows(raw: np.ndarray, qtype: str) -> Q4Rows:
    """A Q4_0, Q4_1 or Q4_K tensor's bytes [rows, row_bytes] -> its 4-bit codes (in groups of 32,
    GGML's nibble order), scales and mins, exactly: Q4_0 is scale * (q - 8), Q4_1 scale * q + min,
    Q4_K per 32-weight sub-block d * sc * q - dmin * m with 6-bit sc and m."""
    n = raw.shape[0]
    if qtype == "Q4_0":
        b = raw.reshape(n, -1, 18)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        return Q4Rows(b[..., 2:].reshape(n, -1).copy(), d, (d.astype(np.float32) * -8).astype(np.float16))
    if qtype == "Q4_1":
        b = raw.reshape(n, -1, 20)
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        m = b[..., 2:4].copy().view(np.float16)[..., 0]
        return Q4Rows(b[..., 4:].reshape(n, -1).copy(), d, m)
    b = raw.reshape(n, -1, 144)  # Q4_K: super blocks of 256 weights
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc = b[..., 4:16]
    scales = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 0xF) | ((sc[..., 0:4] >> 6) << 4)], -1)
    mins = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], -1)
    qs = b[..., 16:].reshape(n, -1, 4, 1, 32)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 32)  # sub-blocks 2j, 2j+1
    scale = (d[..., None] * scales).reshape(n, -1).astype(np.float16)
    mn = (-dmin[..., None] * mins).reshape(n, -1).astype(np.float16)
    return Q4Rows(pack_nibbles(codes), scale, mn)


def q8_rows(raw: np.ndarray) -> Q8Rows:
    """A Q8_0 tensor's bytes [rows, row_bytes] -> its int8 codes and float16 scales, exactly
    (blocks of 34 bytes: the scale, then 32 codes in order)."""
    b = raw.reshape(raw.shape[0], -1, 34)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    return Q8Rows(b[..., 2:].reshape(raw.shape[0], -1).copy().view(np.int8), d)


def hf_name(gguf_name: str) -> str | None:
    """Canonical (Hugging Face) name of a GGUF tensor, or None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute`: interleaved RoPE rows -> split halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (split halves -> interleaved); used to write GGUF files."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists dims innermost first)
    qtype: int
    offset: int  # absolute file offset
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelLoadError(
                self.path, f"truncated GGUF: needs {n} bytes at offset {self.pos}, file has {len(self.buf)}"
            )
        out = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NUMPY:
                itemsize = np.dtype(_NUMPY[etype]).itemsize
                if count * itemsize > len(self.buf) - self.pos:
                    raise ModelLoadError(self.path, f"array of {count} items runs past the end of the file")
                return np.frombuffer(self.take(count * itemsize), dtype=_NUMPY[etype]).tolist()
            if etype == _STRING:
                if count * 8 > len(self.buf) - self.pos:  # every string costs at least its length field
                    raise ModelLoadError(self.path, f"array of {count} strings runs past the end of the file")
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:
                if depth >= _MAX_NESTING:  # llama.cpp writes none; Python's stack would overflow
                    raise ModelLoadError(self.path, f"metadata arrays nested more than {_MAX_NESTING} deep")
                if count * 12 > len(self.buf) - self.pos:  # every array costs its type and count
                    raise ModelLoadError(
                        self.path, f"nested array of {count} items runs past the end of the file"
                    )
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            raise ModelLoadError(self.path, f"unknown array element type {etype}")
        raise ModelLoadError(self.path, f"unknown metadata value type {vtype}")


class GGUFFile:
    """An opened GGUF file: `metadata` (plain Python values), `infos`, `config()`, `tensors()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(self.path, "file not found")
        with open(self.path, "rb") as f:
            size = self.path.stat().st_size
            if size < 24:
                raise ModelLoadError(self.path, f"not a GGUF file: only {size} bytes")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.metadata, self.infos = self._parse()
        except BaseException:
            with contextlib.suppress(BufferError):  # a view still held by the traceback: GC closes it
                self._buf.close()
            raise

    def _parse(self) -> tuple[dict[str, Any], list[TensorInfo]]:
        import gguf

        cur = _Cursor(self._buf, self.path)
        magic = bytes(cur.take(4))
        if magic != GGUF_MAGIC:
            raise ModelLoadError(self.path, f"not a GGUF file: bad magic {magic!r} (expected b'GGUF')")
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ModelLoadError(self.path, f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        # Each entry takes at least 8 (key length) + 4 (type) bytes: reject absurd counts up front.
        if n_kv * 12 + n_tensors * 24 > len(self._buf):
            raise ModelLoadError(
                self.path,
                f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold",
            )
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > _MAX_DIMS:
                raise ModelLoadError(self.path, f"tensor {name!r} claims {n_dims} dimensions")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            raw_infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
        alignment = meta.get("general.alignment", 32)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise ModelLoadError(self.path, f"invalid general.alignment {alignment}")
        data_start = -(-cur.pos // alignment) * alignment
        infos = []
        for name, dims, qtype, offset in raw_infos:
            try:
                qt = gguf.GGMLQuantizationType(qtype)
                block, type_size = gguf.GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise ModelLoadError(self.path, f"tensor {name!r} has unknown type {qtype}") from None
            n = int(np.prod(dims, dtype=object)) if dims else 1
            if not dims or dims[0] % block:
                raise ModelLoadError(
                    self.path, f"tensor {name!r} shape {dims} does not fit {qt.name} blocks of {block}"
                )
            nbytes = n // block * type_size
            start = data_start + offset
            if start + nbytes > len(self._buf):
                raise ModelLoadError(
                    self.path,
                    f"tensor {name!r} ({nbytes} bytes at offset {start}) lies outside the file ({len(self._buf)} bytes): truncated?",
                )
            if start < data_start:
                raise ModelLoadError(
                    self.path, f"tensor {name!r} starts at offset {start}, inside the header"
                )
            infos.append(TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, start, nbytes))
        # Tensors may not share bytes: a small file claiming billions of weights by pointing many
        # tensors at the same data would otherwise pass the size checks and allocate them all.
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos if t.nbytes)
        for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise ModelLoadError(self.path, f"tensors {first!r} and {second!r} overlap in the file")
        return meta, infos

    def config(self) -> LlamaConfig:
        cfg = LlamaConfig.from_gguf_metadata(self.metadata, self.path)
        names = {t.name for t in self.infos}
        if "output.weight" not in names:
            cfg = dataclasses.replace(cfg, tie_embeddings=True)
        if any(n.endswith(".attn_q.bias") for n in names):
            cfg = dataclasses.replace(cfg, qkv_bias=True)
        return cfg

    @property
    def num_elements(self) -> int:
        """Weights the file holds (what a config read from its metadata may claim at most)."""
        return sum(int(np.prod(t.shape, dtype=object)) for t in self.infos)

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 rows `[..., row_bytes]`, as `gguf.quants.dequantize` wants."""
        data = np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return data.reshape(*info.shape[:-1], -1)

    def tensors(
        self, cfg: LlamaConfig, native: bool = False
    ) -> Iterator[tuple[str, np.ndarray | Q4Rows | Q8Rows]]:
        """Yields (canonical name, rows in `[out, in]` order) for each used tensor, one at a
        time: float32 arrays, or with `native` `Q4Rows` for Q4_0/Q4_1/Q4_K tensors and `Q8Rows`
        for Q8_0 ones (their codes, scales and mins as stored, nothing dequantized). Each tensor's file pages are
        released from this process once it is read, so the mapped file does not add to the
        resident memory of a load."""
        unpermute = cfg.architecture in ("llama", "mistral")
        for info in self.infos:
            name = hf_name(info.name)
            if name is None:
                log.debug("%s: skipping unused tensor %s", self.path, info.name)
                continue
            try:
                arr = self.rows(info, native)
            finally:
                self.release(info)
            heads = None
            if unpermute and name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = cfg.n_heads
            elif unpermute and name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = cfg.n_kv_heads
            if heads is not None:
                if arr.shape[0] != heads * cfg.head_dim:
                    raise ModelLoadError(
                        self.path,
                        f"tensor {info.name!r} has {arr.shape[0]} rows, but the metadata's {heads} heads"
                        f" of {cfg.head_dim} make {heads * cfg.head_dim}",
                    )
                if isinstance(arr, (Q4Rows, Q8Rows)):
                    arr = type(arr)(*(unpermute_rope_rows(a, heads) for a in arr))
                else:
                    arr = unpermute_rope_rows(arr, heads)
            yield name, arr

    def rows(self, info: TensorInfo, native: bool = False) -> np.ndarray | Q4Rows | Q8Rows:
        """One tensor's values: float32 `info.shape`, or with `native` `Q4Rows` for a 4-bit type
        and `Q8Rows` for Q8_0."""
        import gguf

        qt = gguf.GGMLQuantizationType(info.qtype)
        if native and qt.name in Q4_TYPES and len(info.shape) == 2:
            return q4_rows(self.raw(info), qt.name)
        if native and qt.name == "Q8_0" and len(info.shape) == 2:
            return q8_rows(self.raw(info))
        try:
            arr = gguf.quants.dequantize(self.raw(info), qt)
        except NotImplementedError:
            raise ModelLoadError(self.path, f"tensor {info.name!r} has unsupported type {qt.name}") from None
        return np.asarray(arr, dtype=np.float32).reshape(info.shape)

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's pages from this process's memory (they stay in the page cache)."""
        page = mmap.PAGESIZE
        start = info.offset // page * page
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self._buf.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def type_bits(self, info: TensorInfo) -> int:
        """Bits per weight of a tensor's type, as its name says (Q4_K: 4, Q8_0: 8, F16: 16)."""
        import gguf

        return type_bits(gguf.GGMLQuantizationType(info.qtype).name)

    def close(self) -> None:
        self._buf.close()
