"""API keys: `Authorization: Bearer <key>` on every `/v1/*` route and on tokenize, detokenize,
apply-template, slots, props and metrics; `/health`, `/version` (and the web page) stay open.

Keys are compared in constant time (digests of equal length, every key checked) and never
logged. A server without keys on an address other machines can reach is logged as a warning.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

from serve.errors import APIError

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset(
    {"/health", "/version", "/", "/favicon.ico", "/openapi.json", "/docs"}
)  # no secrets in these


def protected(path: str) -> bool:
    return path not in OPEN_PATHS and not path.startswith("/static/webui/")


def reachable(host: str) -> bool:
    """Whether other machines may reach a server listening on `host` (a name: assume so)."""
    host = host.strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def warn_open(address: str) -> None:
    log.warning(
        "listening on %s without API keys: anyone who can reach it can run the models and read "
        "/slots and /metrics; set LLAMA_JAX_API_KEYS (or --api-key), or listen on 127.0.0.1",
        address,
    )


class KeyChecker:
    def __init__(self, keys: tuple[str, ...]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> str:
        """The caller's key, or a 401 (OpenAI's `invalid_api_key`)."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise _unauthorized(
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        digest = hashlib.sha256(key.encode()).digest()
        found = False
        for d in self._digests:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(d, digest)
        if not found:
            raise _unauthorized(f"Incorrect API key provided: {_redact(key)}.")
        return key


def _redact(key: str) -> str:
    return key[:3] + "*" * 4 + key[-2:] if len(key) > 8 else "****"


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": 'Bearer realm="llama-jax"'},
    )
