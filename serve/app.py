"""The Quart app: `hypercorn serve.app:app` (settings from `LLAMA_JAX_*` variables) or
`create_app(settings)` (what `llama-jax serve` and the tests use).

The app starts listening at once and loads its models on a worker thread (`/health` answers
503 `loading` meanwhile). Per request, in order: an `x-request-id`, the API key check, the
per-client request rate limit (`/v1/*` and the tokenizer routes), the handler (which may
reserve tokens), then rate-limit and CORS headers; one log line and the metrics when the
response (or stream) ends, with control characters of the request escaped so that a request
cannot write lines of its own. Errors of any kind leave as OpenAI error objects
(`serve/errors.py`). There is no static folder: the web page's files have their own route.
"""

from __future__ import annotations

import logging
import re

from pydantic import ValidationError
from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

from llama_jax import LlamaJaxError
from serve.auth import KeyChecker, protected, reachable, warn_open
from serve.errors import APIError, from_http, from_library, from_validation
from serve.handlers import (
    RequestRecord,
    chat,
    completions,
    docs,
    embeddings,
    health,
    info,
    models,
    new_id,
    responses,
    tokenize,
    webui,
)
from serve.limits import RateLimiter
from serve.metrics import ServerMetrics
from serve.settings import Settings
from serve.state import ServerState

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # line breaks and terminal escapes
LIMITED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/apply-template")  # the request rate limit
OPEN_WARNED = "LLAMA_JAX_OPEN_WARNED"  # app.config: the no-keys warning was logged


def printable(text: str) -> str:
    """`text` with control characters as escapes (`\\n`, `\\x1b`), for a log line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def rate_limited(path: str) -> bool:
    return path.startswith(LIMITED_PREFIXES)


def create_app(settings: Settings | None = None) -> Quart:
    settings = settings or Settings.from_env()
    # No static folder: Quart's default would serve $CWD/static, outside auth (serve/auth.py).
    app = Quart("llama_jax_server", static_folder=None)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,  # generations may take minutes; streams are never cut
        BODY_TIMEOUT=60,
    )
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    st = ServerState(settings)
    keys = KeyChecker(settings.api_keys)
    limiter = RateLimiter(settings)
    metrics = ServerMetrics(st, limiter.rejections)
    app.extensions["llama_jax"] = st
    for module in (health, info, models, chat, completions, responses, embeddings, tokenize, docs):
        app.register_blueprint(module.bp)
    if settings.webui:
        app.register_blueprint(webui.bp)

    @app.get("/metrics")
    async def _metrics():
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.before_serving
    async def _start() -> None:
        # Under bare `hypercorn serve.app:app` nobody has configured logging (no-op otherwise).
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        st.start()

    @app.after_serving
    async def _stop() -> None:
        await st.close()

    @app.before_request
    async def _begin() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else new_id("req")
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        g.record = RequestRecord(
            g.request_id,
            request.method,
            printable(request.path),
            rule,
            request.remote_addr or "-",
            None,
            limiter,
            metrics,
        )
        if not keys.enabled and not app.config.get(OPEN_WARNED):
            _warn_if_reachable()
        if request.method == "OPTIONS" or not protected(request.path):
            return
        if keys.enabled:
            g.record.key = keys.check(request.headers.get("Authorization"))
            g.record.client = "key:" + g.record.key
        if rate_limited(request.path):
            limiter.take_request(g.record.client, g.record.key)

    def _warn_if_reachable() -> None:
        # Under bare hypercorn the app does not know its bind address: the first request
        # that arrives on a non-loopback one tells (`llama-jax serve` warns at start).
        server = request.scope.get("server")
        if server and reachable(str(server[0])):
            app.config[OPEN_WARNED] = True
            warn_open(f"{server[0]}:{server[1]}")

    @app.after_request
    async def _end(response: Response) -> Response:
        rec: RequestRecord | None = g.get("record")
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if rec is not None and not g.get("streaming"):
            rec.finish(response.status_code)  # first: the headers then show the settled token budget
        if rec is not None and rate_limited(request.path):
            response.headers.update(limiter.headers(rec.client, rec.key))
        _cors(response)
        return response

    @app.teardown_request
    async def _teardown(_exc: BaseException | None) -> None:
        rec: RequestRecord | None = g.get("record")
        if rec is not None and not g.get("streaming"):
            rec.finish(499, "disconnected")  # no-op when the response was sent

    def _cors(response: Response) -> None:
        origin = request.headers.get("Origin")
        allowed = settings.cors_origins
        if not origin or not allowed or ("*" not in allowed and origin not in allowed):
            return
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-Request-Id"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Expose-Headers"] = (
            "X-Request-Id, Retry-After, x-ratelimit-remaining-requests"
        )

    _error_handlers(app)
    return app


def _error_handlers(app: Quart) -> None:
    """Whatever a request raises leaves as an OpenAI error object: `APIError` as it is, the
    library's errors through `from_library` (one mapping), bad bodies and HTTP errors as 400s
    and the like, anything else as a logged 500."""

    @app.errorhandler(APIError)
    async def _api_error(e: APIError):
        return e.response()

    @app.errorhandler(LlamaJaxError)
    async def _library_error(e: LlamaJaxError):
        return from_library(e).response()

    @app.errorhandler(ValidationError)
    async def _validation_error(e: ValidationError):
        return await _api_error(from_validation(e))

    @app.errorhandler(HTTPException)
    async def _http_error(e: HTTPException):
        return await _api_error(from_http(e))

    @app.errorhandler(Exception)
    async def _server_error(e: Exception):
        log.exception("unhandled error in %s %s", request.method, printable(request.path))
        return await _api_error(
            APIError(500, "The server had an error while processing your request.", "server_error")
        )


# For `hypercorn serve.app:app`. Building the app is cheap: the models load when serving starts.
app = create_app()
