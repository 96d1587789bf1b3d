"""Hostile GGUF files against llama_jax/gguf.py (and the GGUF tokenizer it feeds), beyond the
hand-picked corruptions of test_gguf.py: random byte mutations of the header, metadata and
tensor infos, random truncations, and hand-built metadata no converter writes (deep nesting,
absurd array counts, unknown types). Every file either reads or raises `ModelLoadError`,
quickly, never allocating more than a small multiple of the file's own size."""

from __future__ import annotations

import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import random_tensors, tiny_config, write_gguf

from llama_jax.errors import ModelLoadError
from llama_jax.gguf import GGUFFile
from llama_jax.tokenizer import Tokenizer

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> bytes:
    cfg = tiny_config()
    path = write_gguf(tmp_path_factory.mktemp("hostile") / "tiny.gguf", cfg, random_tensors(cfg))
    return path.read_bytes()


@pytest.fixture(scope="module")
def header_size(original, tmp_path_factory) -> int:
    """Bytes before the tensor data: header, metadata and tensor infos."""
    path = tmp_path_factory.mktemp("hostile") / "h.gguf"
    path.write_bytes(original)
    return min(t.offset for t in GGUFFile(path).infos)


def read_everything(path) -> None:
    """What loading does with a file before building the model: parse, config, tokenizer, tensors."""
    gg = GGUFFile(path)
    cfg = gg.config()
    Tokenizer.from_gguf_metadata(gg.metadata, path)
    for _ in gg.tensors(cfg):
        pass


def check_hostile(path, size: int) -> None:
    """`path` reads or raises ModelLoadError, in under 2 s, allocating under 4x the file + 4 MB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        read_everything(path)
    except ModelLoadError as e:
        assert str(path) in str(e)
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < 2.0
    assert peak < 4 * size + 4 * 2**20, peak


@FUZZ
@given(data=st.data())
def test_random_mutations_of_the_header_read_or_raise_model_load_error(
    tmp_path_factory, original, header_size, data
):
    buf = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, header_size - 1))
        chunk = data.draw(
            st.sampled_from([b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff\xff\xff\xff\xff"])
            | st.binary(min_size=1, max_size=8)
        )
        buf[at : at + len(chunk)] = chunk
    path = tmp_path_factory.mktemp("m") / "mutated.gguf"
    path.write_bytes(bytes(buf[: len(original)]))
    check_hostile(path, len(original))


@FUZZ
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_random_truncations_raise_model_load_error(tmp_path_factory, original, fraction):
    path = tmp_path_factory.mktemp("t") / "cut.gguf"
    path.write_bytes(original[: int(len(original) * fraction)])
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError):
        read_everything(path)
    assert time.perf_counter() - t0 < 2.0


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _file(tmp_path, body: bytes, n_kv: int = 1, n_tensors: int = 0, pad: int = 0):
    path = tmp_path / "built.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body + b"\0" * pad)
    return path


ARRAY, STRING, UINT32 = 9, 8, 4


@pytest.mark.parametrize(
    ("name", "body", "problem"),
    [
        (
            "arrays nested 5000 deep",
            _string("k")
            + struct.pack("<I", ARRAY)
            + struct.pack("<IQ", ARRAY, 1) * 5000
            + struct.pack("<IQ", UINT32, 0),
            "nested more than",
        ),
        ("2**60 nested arrays", _string("k") + struct.pack("<IIQ", ARRAY, ARRAY, 2**60), "runs past the end"),
        ("2**62 uint32 items", _string("k") + struct.pack("<IIQ", ARRAY, UINT32, 2**62), "runs past the end"),
        ("2**63 strings", _string("k") + struct.pack("<IIQ", ARRAY, STRING, 2**63), "runs past the end"),
        ("a 2**64-1 byte string", _string("k") + struct.pack("<IQ", STRING, 2**64 - 1), "truncated"),
        ("unknown value type", _string("k") + struct.pack("<I", 77), "unknown metadata value type 77"),
        (
            "unknown element type",
            _string("k") + struct.pack("<IIQ", ARRAY, 77, 1),
            "unknown array element type 77",
        ),
        ("a 2**64-1 byte key", struct.pack("<Q", 2**64 - 1), "truncated"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
def test_hand_built_metadata_fails_fast(tmp_path, name, body, problem):
    path = _file(tmp_path, body, pad=64)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ModelLoadError, match=problem):
            GGUFFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 0.5
    assert peak < 2**20, peak


@pytest.mark.parametrize(
    ("dims", "problem"),
    [
        ([2**32, 2**32, 2**32, 2**32], "outside the file"),  # an element count past 64 bits
        ([2**63, 2], "outside the file"),
        ([0], "unsupported architecture None"),  # an empty tensor reads; the metadata is missing
    ],
)
def test_tensor_dims_whose_size_overflows_are_refused(tmp_path, dims, problem):
    info = _string("token_embd.weight") + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
    info += struct.pack("<IQ", 0, 0)  # F32 at offset 0
    path = _file(tmp_path, info, n_kv=0, n_tensors=1, pad=64)
    with pytest.raises(ModelLoadError, match=problem):
        read_everything(path)


def test_tensors_that_share_bytes_are_refused(tmp_path):
    """Many tensors pointing at the same bytes: a small file could claim billions of weights,
    pass the size checks and have them all allocated. Overlapping data ranges are refused."""
    infos = b""
    for i in range(3):  # three 8x8 F32 tensors, all at offset 0
        infos += _string(f"blk.{i}.ffn_up.weight") + struct.pack("<I2Q", 2, 8, 8) + struct.pack("<IQ", 0, 0)
    path = _file(tmp_path, infos, n_kv=0, n_tensors=3, pad=64 + 256)
    with pytest.raises(ModelLoadError, match="overlap in the file"):
        GGUFFile(path)
    apart = b""
    for i in range(3):  # the same tensors side by side read fine
        apart += (
            _string(f"blk.{i}.ffn_up.weight") + struct.pack("<I2Q", 2, 8, 8) + struct.pack("<IQ", 0, 256 * i)
        )
    GGUFFile(_file(tmp_path, apart, n_kv=0, n_tensors=3, pad=64 + 3 * 256))
