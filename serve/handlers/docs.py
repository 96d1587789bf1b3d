"""`GET /openapi.json` (the OpenAPI 3.1 description, `serve/openapi.py`) and `GET /docs`
(the same as one self-contained HTML page: no scripts, no CDN, its one stylesheet allowed by
hash in its Content-Security-Policy)."""

from __future__ import annotations

import base64
import hashlib
import html
import json

from quart import Blueprint, Response

from serve import openapi
from serve.handlers import state

bp = Blueprint("docs", __name__)

_CSS = (
    "body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "code,pre{font:13px ui-monospace,monospace}pre{background:#f5f5f5;padding:.6rem;overflow:auto}"
    "h2{border-bottom:1px solid #ddd;margin-top:2.5rem}.m{font-weight:bold;text-transform:uppercase}"
    "details{margin:.3rem 0}"
)
_CSP = (
    f"default-src 'none'; style-src 'sha256-{base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()}'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@bp.get("/openapi.json")
async def openapi_json():
    return openapi.build(state().settings)


@bp.get("/docs")
async def docs():
    response = Response(render(openapi.build(state().settings)), content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _schema_link(schema: dict | None) -> str:
    if not schema:
        return ""
    ref = schema.get("$ref") or schema.get("items", {}).get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[1]
        return f'<a href="#schema-{html.escape(name)}"><code>{html.escape(name)}</code></a>'
    return f"<code>{html.escape(json.dumps(schema))}</code>"


def render(spec: dict) -> str:
    """The description as HTML: each operation, then each schema."""
    e = html.escape
    info = spec["info"]
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{e(info['title'])} API</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(info['title'])} {e(info['version'])} API</h1><p>{e(info['description'])}</p>",
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1).</p><h2>Operations</h2>',
    ]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            out.append(
                f"<h3><span class=m>{e(method)}</span> <code>{e(path)}</code></h3><p>{e(op['summary'])}</p>"
            )
            for p in op.get("parameters", []):
                out.append(
                    f"<p>{e(p['in'])} parameter <code>{e(p['name'])}</code>: {e(p.get('description', ''))}</p>"
                )
            body = op.get("requestBody", {}).get("content", {}).get(openapi.JSON, {}).get("schema")
            if body:
                out.append(f"<p>Request body: {_schema_link(body)}</p>")
            out.append("<ul>")
            for status, r in op["responses"].items():
                kinds = ", ".join(
                    f"{e(media)} {_schema_link(c.get('x-event-schema') or c.get('schema'))}"
                    for media, c in r.get("content", {}).items()
                )
                out.append(f"<li><b>{e(status)}</b> {e(r['description'])} {kinds}</li>")
            out.append("</ul>")
    out.append("<h2>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        out.append(
            f'<details id="schema-{e(name)}"><summary><code>{e(name)}</code> {e(schema.get("description", ""))}'
            f"</summary><pre>{e(json.dumps(schema, indent=2, ensure_ascii=False))}</pre></details>"
        )
    out.append("</body></html>")
    return "\n".join(out)
