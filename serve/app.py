"""The Quart app: `hypercorn serve.app:app` (settings from `LLAMA_JAX_*` variables) or
`create_app(settings)` (what `llama-jax serve` and the tests use).

The app starts listening at once and loads the model on a worker thread (`/health` answers
503 `loading` meanwhile). Every response carries an `x-request-id`; every request is logged in
one line. Errors of any kind leave as OpenAI error objects (`serve/errors.py`).
"""

from __future__ import annotations

import logging
import re
import time

from pydantic import ValidationError
from quart import Quart, g, request
from werkzeug.exceptions import HTTPException

from serve.errors import APIError, from_http, from_validation
from serve.handlers import chat, completions, embeddings, health, log_request, models, new_id, tokenize
from serve.settings import Settings
from serve.state import ServerState

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(settings: Settings | None = None) -> Quart:
    settings = settings or Settings.from_env()
    app = Quart("llama_jax_server")
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        RESPONSE_TIMEOUT=None,  # generations may take minutes; streams are never cut
        BODY_TIMEOUT=60,
        JSON_SORT_KEYS=False,
        PROVIDE_AUTOMATIC_OPTIONS=True,
    )
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    st = ServerState(settings)
    app.extensions["llama_jax"] = st
    for module in (health, models, chat, completions, embeddings, tokenize):
        app.register_blueprint(module.bp)

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
        g.started = time.monotonic()

    @app.after_request
    async def _end(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if not g.get("streaming"):
            log_request(
                g.get("request_id", "-"),
                request.method,
                request.path,
                response.status_code,
                g.get("tokens"),
                time.monotonic() - g.get("started", time.monotonic()),
            )
        return response

    @app.errorhandler(APIError)
    async def _api_error(e: APIError):
        return e.body(), e.status, e.headers

    @app.errorhandler(ValidationError)
    async def _validation_error(e: ValidationError):
        return await _api_error(from_validation(e))

    @app.errorhandler(HTTPException)
    async def _http_error(e: HTTPException):
        return await _api_error(from_http(e))

    @app.errorhandler(Exception)
    async def _server_error(e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.path)
        return await _api_error(
            APIError(500, "The server had an error while processing your request.", "server_error")
        )

    return app


# For `hypercorn serve.app:app`. Building the app is cheap: the model loads when serving starts.
app = create_app()
