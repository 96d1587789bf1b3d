"""The chat page: `GET /` and its files under `/static/webui/` (from `serve/webui/`, no build step).

Registered only when `settings.webui` is true (`llama-jax serve --no-webui` leaves `/` a JSON
404). Both routes stay open without an API key (`serve/auth.py`); the page itself sends the
key the user types. Every response carries a Content-Security-Policy that allows the page's
own origin only: no CDNs, no inline scripts, no external images or fonts.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response

from serve.errors import APIError

bp = Blueprint("webui", __name__)

ROOT = Path(__file__).resolve().parent.parent / "webui"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE files
}


def _file(relative: str) -> Response:
    path = (ROOT / relative).resolve()
    content_type = _TYPES.get(path.suffix)
    if not path.is_relative_to(ROOT) or content_type is None or not path.is_file():
        raise APIError(404, f"No such file: /static/webui/{relative}", code="not_found")
    response = Response(path.read_bytes(), content_type=content_type)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"  # revalidate: a server upgrade shows at once
    return response


@bp.get("/")
async def index():
    return _file("index.html")


@bp.get("/static/webui/<path:filename>")
async def static(filename: str):
    return _file(filename)
