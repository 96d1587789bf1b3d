"""Writes and runs notebooks/serving.ipynb (run: python scripts/make_serving_notebook.py)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# Serving llama-jax over HTTP\n\n"
        "Start the OpenAI-compatible server from this notebook, call it with the official `openai` "
        "client (chat, streaming, embeddings) and run a small similarity search. In a terminal the same "
        "server is `make serve` (or `llama-jax serve`)."
    ),
    new_code_cell(
        "import shutil, socket, subprocess, sys, time\n"
        "from pathlib import Path\n\n"
        "import httpx\n\n"
        "with socket.socket() as s:  # a free port\n"
        '    s.bind(("127.0.0.1", 0))\n'
        "    port = s.getsockname()[1]\n"
        'llama_jax = shutil.which("llama-jax", path=str(Path(sys.executable).parent))\n'
        "server = subprocess.Popen(\n"
        '    [llama_jax, "serve", "--port", str(port), "--max-slots", "4", "--max-seq-len", "512", "--no-warmup"],\n'
        "    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,\n"
        ")\n"
        'base = f"http://127.0.0.1:{port}"\n'
        "for _ in range(600):  # /health answers 503 while the model loads\n"
        "    try:\n"
        '        if httpx.get(base + "/health").status_code == 200:\n'
        "            break\n"
        "    except httpx.TransportError:\n"
        "        pass\n"
        "    time.sleep(0.5)\n"
        'print(httpx.get(base + "/health").json())'
    ),
    new_markdown_cell(
        "## Chat with the official client\nAny API key works while the server has none configured."
    ),
    new_code_cell(
        "from openai import OpenAI\n\n"
        'client = OpenAI(api_key="not-needed", base_url=base + "/v1")\n'
        "model = client.models.list().data[0].id\n"
        "response = client.chat.completions.create(\n"
        '    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0\n'
        ")\n"
        "print(model, '->', response.choices[0].message.content)\n"
        "print(response.usage)"
    ),
    new_markdown_cell(
        "## Streaming\nTokens arrive as server-sent events; the client yields one chunk per delta. "
        "`top_p` and a `frequency_penalty` keep a small model's sample from looping."
    ),
    new_code_cell(
        "stream = client.chat.completions.create(\n"
        "    model=model,\n"
        '    messages=[{"role": "user", "content": "Write a haiku about the sea."}],\n'
        "    stream=True, seed=42, max_tokens=60, temperature=0.7, top_p=0.9, frequency_penalty=0.5,\n"
        ")\n"
        "for chunk in stream:\n"
        '    print(chunk.choices[0].delta.content or "", end="", flush=True)'
    ),
    new_markdown_cell(
        "## Embeddings and a similarity search\n"
        "The vectors are L2-normalized, so a dot product is the cosine similarity. They are the chat "
        "model's mean-pooled hidden states: good enough to show the API, far from a trained embedding model."
    ),
    new_code_cell(
        "import numpy as np\n\n"
        "sentences = [\n"
        '    "The cat sat on the mat.",\n'
        '    "A kitten is sleeping on the rug.",\n'
        '    "Stock markets fell sharply today.",\n'
        '    "Investors sold shares as prices dropped.",\n'
        '    "Paris is the capital of France.",\n'
        '    "France\'s capital city is Paris.",\n'
        "]\n"
        "vectors = np.array([d.embedding for d in client.embeddings.create(model=model, input=sentences).data])\n"
        "similarity = vectors @ vectors.T\n"
        "vectors.shape"
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n\n"
        "fig, ax = plt.subplots(figsize=(6, 5))\n"
        'im = ax.imshow(similarity, cmap="viridis")\n'
        "ax.set_xticks(range(len(sentences)), [s[:18] + '…' for s in sentences], rotation=45, ha='right')\n"
        "ax.set_yticks(range(len(sentences)), [s[:18] + '…' for s in sentences])\n"
        "fig.colorbar(im)\n"
        'ax.set_title("cosine similarity")\n'
        "fig.tight_layout()"
    ),
    new_code_cell(
        'query = "Where is the French government seated?"\n'
        "q = np.array(client.embeddings.create(model=model, input=query).data[0].embedding)\n"
        "for score, s in sorted(zip(vectors @ q, sentences), reverse=True)[:3]:\n"
        '    print(f"{score:.3f}  {s}")'
    ),
    new_markdown_cell(
        "## Function calling: the tool loop\n"
        'With `tool_choice="required"` (or a named function) the call is generated under a grammar of the '
        "tools' parameter schemas, so its arguments always parse and validate, even from a 135M model. "
        "The client runs the tool and sends the result back in a `tool` message; the model then answers "
        "(the system message asks it to answer from the result, not to repeat it)."
    ),
    new_code_cell(
        "import json\n\n"
        'def get_weather(city: str, unit: str = "celsius") -> dict:\n'
        '    return {"city": city, "temperature": 21, "unit": unit, "sky": "sunny"}\n\n'
        'tools = [{"type": "function", "function": {\n'
        '    "name": "get_weather", "description": "Current weather in a city",\n'
        '    "parameters": {"type": "object", "required": ["city", "unit"], "properties": {\n'
        '        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}]\n'
        'messages = [{"role": "system", "content": "You are a helpful assistant. Use the tool\'s result to answer the user in one sentence."},\n'
        '            {"role": "user", "content": "What is the weather like in Paris today?"}]\n'
        "reply = client.chat.completions.create(model=model, messages=messages, tools=tools,\n"
        '                                       tool_choice="required", parallel_tool_calls=False, temperature=0)\n'
        "calls = reply.choices[0].message.tool_calls\n"
        "print(reply.choices[0].finish_reason, [(c.function.name, c.function.arguments) for c in calls])\n"
        "messages.append(reply.choices[0].message)\n"
        "for call in calls:\n"
        "    result = get_weather(**json.loads(call.function.arguments))\n"
        '    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})\n'
        "final = client.chat.completions.create(model=model, messages=messages, tools=tools,\n"
        '                                       tool_choice="none", temperature=0, max_tokens=60)\n'
        "print(final.choices[0].message.content)"
    ),
    new_markdown_cell(
        "## Structured output\n"
        "`response_format` with a JSON schema: the reply is valid JSON matching the schema at any "
        "temperature. A JSON string may hold any character, control characters included, and a small "
        "model sampling at a high temperature will find some: the `pattern` keeps the name to words."
    ),
    new_code_cell(
        'schema = {"type": "object", "required": ["name", "population", "continent"], "properties": {\n'
        '    "name": {"type": "string", "pattern": "^[A-Z][a-z]+( [A-Z][a-z]+)?$"},\n'
        '    "population": {"type": "integer", "minimum": 1000, "maximum": 40000000},\n'
        '    "continent": {"enum": ["Africa", "America", "Asia", "Europe", "Oceania"]}}}\n'
        "for seed in range(3):\n"
        "    r = client.chat.completions.create(\n"
        "        model=model, temperature=0.8, seed=seed, max_tokens=60,\n"
        '        messages=[{"role": "user", "content": "Invent a city and describe it in JSON."}],\n'
        '        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},\n'
        "    )\n"
        "    print(json.loads(r.choices[0].message.content))"
    ),
    new_markdown_cell("## Stop the server"),
    new_code_cell("server.terminate()\nserver.wait(30)"),
]

nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
path = Path(__file__).resolve().parent.parent / "notebooks" / "serving.ipynb"
NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
).execute()
nbformat.write(nb, path)
print("wrote", path)
