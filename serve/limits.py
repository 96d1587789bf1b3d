"""Per-client rate limits as token buckets: requests per minute and tokens per minute.

A client is its API key, or its address when keys are off. Each request takes one request
token when it arrives; a generation also reserves `prompt + max_tokens` tokens, and gives back
what it did not use when it ends. A bucket holds at most one minute's allowance and refills
continuously. Over a limit: 429 `rate_limit_exceeded` with `Retry-After`; every response
carries OpenAI's `x-ratelimit-*` headers.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

from serve.errors import APIError
from serve.settings import RateLimit, Settings


@dataclasses.dataclass
class Bucket:
    capacity: float
    level: float
    updated: float

    @property
    def rate(self) -> float:  # per second
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, n: float) -> float:
        """Seconds until `n` can be taken (0 when it can now)."""
        return max(0.0, (n - self.level) / self.rate)

    def reset_in(self) -> float:
        return (self.capacity - self.level) / self.rate


class RateLimiter:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._lock = threading.Lock()
        self.rejections = {"requests": 0, "tokens": 0}

    def limit(self, client: str, key: str | None) -> RateLimit:
        return self.settings.rate_limit(key)

    def _bucket(self, client: str, kind: str, capacity: int, now: float) -> Bucket:
        if len(self._buckets) > 10_000:  # forget clients whose buckets have refilled: no state lost
            for k, old in list(self._buckets.items()):
                old.refill(now)
                if old.level >= old.capacity:
                    del self._buckets[k]
        b = self._buckets.get((client, kind))
        if b is None or b.capacity != capacity:
            b = self._buckets[(client, kind)] = Bucket(capacity, capacity, now)
        b.refill(now)
        return b

    def take_request(self, client: str, key: str | None) -> None:
        lim = self.limit(client, key)
        if not lim.rpm:
            return
        with self._lock:
            b = self._bucket(client, "requests", lim.rpm, time.monotonic())
            if b.level < 1:
                self.rejections["requests"] += 1
                raise _too_many("requests", lim.rpm, b.wait_for(1))
            b.level -= 1

    def reserve_tokens(self, client: str, key: str | None, n: int) -> int:
        """Reserve `n` tokens (returns what was reserved: 0 when tokens are not limited)."""
        lim = self.limit(client, key)
        if not lim.tpm:
            return 0
        if n > lim.tpm:
            raise APIError(
                429,
                f"Request too large: {n} tokens (prompt + max_tokens) exceed your limit of {lim.tpm} "
                "tokens per minute. Lower max_tokens.",
                type="tokens",
                param="max_tokens",
                code="rate_limit_exceeded",
                headers={"x-should-retry": "false"},
            )
        with self._lock:
            b = self._bucket(client, "tokens", lim.tpm, time.monotonic())
            if b.level < n:
                self.rejections["tokens"] += 1
                raise _too_many("tokens", lim.tpm, b.wait_for(n))
            b.level -= n
        return n

    def settle(self, client: str, key: str | None, reserved: int, used: int) -> None:
        """Give back the reserved tokens a finished request did not use."""
        lim = self.limit(client, key)
        if not reserved or not lim.tpm:
            return
        with self._lock:
            b = self._bucket(client, "tokens", lim.tpm, time.monotonic())
            b.level = min(b.capacity, b.level + max(0, reserved - used))

    def headers(self, client: str, key: str | None) -> dict[str, str]:
        lim = self.limit(client, key)
        out: dict[str, str] = {}
        now = time.monotonic()
        with self._lock:
            for kind, cap in (("requests", lim.rpm), ("tokens", lim.tpm)):
                if not cap:
                    continue
                b = self._bucket(client, kind, cap, now)
                out[f"x-ratelimit-limit-{kind}"] = str(cap)
                out[f"x-ratelimit-remaining-{kind}"] = str(int(b.level))
                out[f"x-ratelimit-reset-{kind}"] = _duration(b.reset_in())
        return out


def _too_many(kind: str, limit: int, wait: float) -> APIError:
    seconds = max(1, math.ceil(wait))
    return APIError(
        429,
        f"Rate limit reached: {limit} {kind} per minute. Please try again in {_duration(wait)}.",
        type=kind,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(seconds), "retry-after-ms": str(max(1, math.ceil(wait * 1000)))},
    )


def _duration(seconds: float) -> str:
    """OpenAI's style: `12ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"
