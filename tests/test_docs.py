"""Every curl example in the README and docs/ runs as written against a live server (the
session's default-model server; `127.0.0.1:8080`/`localhost:8080` point at it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

pytestmark = pytest.mark.slow


def curl_examples() -> list[tuple[str, str]]:
    """(file, command) for each curl command in a ```bash block (continuation lines joined)."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            lines, current = [], ""
            for line in block.splitlines():
                if line.lstrip().startswith("#") and not current:
                    continue
                current += line + "\n"
                if not line.rstrip().endswith("\\") and current.count("'") % 2 == 0:
                    lines.append(current.strip())
                    current = ""
            found += [(path.name, c) for c in lines if c.startswith("curl ")]
    return found


EXAMPLES = curl_examples()


def test_the_docs_have_curl_examples():
    assert len(EXAMPLES) >= 8 and {f for f, _ in EXAMPLES} >= {"README.md", "http-api.md"}


@pytest.mark.parametrize(("doc", "command"), EXAMPLES, ids=[f"{f}:{i}" for i, (f, _) in enumerate(EXAMPLES)])
def test_curl_example_runs(server, doc, command):
    assert shutil.which("curl")
    cmd = re.sub(r"(127\.0\.0\.1|localhost):8080", f"127.0.0.1:{server.port}", command)
    cmd = re.sub(r"\s#.*$", "", cmd, flags=re.M)  # trailing comments
    out = subprocess.run(
        ["bash", "-c", cmd + " -s -w '\\n%{http_code}'"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    assert status == "200", (doc, command, out.stdout[-2000:])
    if body.startswith("data: "):
        assert body.rstrip().endswith("data: [DONE]")
    elif body.startswith(("{", "[")):
        parsed = json.loads(body)
        # a Responses API object has "error": null
        assert not (isinstance(parsed, dict) and parsed.get("error")), body[:500]
    else:
        assert "/metrics" in command and "llama_jax_" in body  # Prometheus text


def test_readme_client_examples_run(server, tmp_path):
    """The README's `openai` client snippets, in order, as one script against the live server:
    streaming, embeddings and the tool-call loop."""
    import sys

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    client_blocks = [b for b in blocks if "OpenAI(" in b or "client." in b]
    assert any("tool_calls" in b for b in client_blocks)
    script = re.sub(r"(127\.0\.0\.1|localhost):8080", f"127.0.0.1:{server.port}", "\n".join(client_blocks))
    (tmp_path / "readme.py").write_text(script)
    out = subprocess.run(
        [sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()
