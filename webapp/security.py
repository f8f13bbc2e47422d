"""Security headers on every response, and login rate limiting.

Headers: a Content-Security-Policy without inline scripts (the templates load their only script,
static/case.js, from a file), `nosniff`, `X-Frame-Options: DENY` (and `frame-ancestors 'none'`),
`Referrer-Policy: same-origin`, a restrictive Permissions-Policy, HSTS in production, and
`Cache-Control: no-store` on pages and API answers (they carry patient metadata).
Inline `style=""` attributes stay allowed (`style-src 'unsafe-inline'`): the probability bars set
their width that way, and CSS cannot run code.

Login rate limiting: at most LOGIN_MAX_FAILURES (5) failed logins per (email, client IP) in
LOGIN_WINDOW seconds (15 minutes); further attempts get 429 with Retry-After, even with the right
password, until the window has passed. Counters live in Redis (the broker, shared by every
gunicorn worker and web container) as one key per (email, IP) with a TTL; when Redis cannot be
reached they fall back to this process's memory, so the limit still holds per process (with N
gunicorn processes an attacker gets at most N x 5 tries per window while Redis is down).
A successful login clears the counter.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from flask import Flask, current_app, request

LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW = 15 * 60  # seconds

CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def init_app(app: Flask) -> None:
    """Adds the security headers to every response and a login limiter to the app."""
    app.extensions["login_limiter"] = LoginLimiter(
        redis_url=app.config.get("REDIS_URL"),
        max_failures=int(app.config.get("LOGIN_MAX_FAILURES", LOGIN_MAX_FAILURES)),
        window=int(app.config.get("LOGIN_WINDOW", LOGIN_WINDOW)),
        timeout=float(app.config.get("BROKER_TIMEOUT", 2.0)),
    )
    production = app.config.get("PORTAL_ENV") == "production"

    @app.after_request
    def _security_headers(response):
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if production:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        if request.endpoint != "static" and not request.path.startswith("/files/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def login_limiter() -> "LoginLimiter":
    return current_app.extensions["login_limiter"]


def client_ip() -> str:
    """The peer address. Behind a reverse proxy, wrap the app in werkzeug's ProxyFix so that this
    is the client's address and not the proxy's (see README.md, SECURITY)."""
    return request.remote_addr or "unknown"


class LoginLimiter:
    """Counts failed logins per (email, IP) in a fixed window; Redis first, memory as fallback."""

    def __init__(self, redis_url: str | None, max_failures: int = LOGIN_MAX_FAILURES,
                 window: int = LOGIN_WINDOW, timeout: float = 2.0):
        self.redis_url, self.max_failures, self.window, self.timeout = redis_url, max_failures, window, timeout
        self._memory: dict[str, tuple[int, float]] = {}  # key -> (failures, window end)
        self._lock = threading.Lock()
        self._redis: Any = None
        self._redis_down_until = 0.0  # after a failed connection, use memory for a while

    @staticmethod
    def key(email: str, ip: str) -> str:
        digest = hashlib.sha256(f"{email.strip().lower()}\0{ip}".encode()).hexdigest()[:32]
        return f"dermportal:login-failures:{digest}"

    def _client(self):
        if not self.redis_url or time.monotonic() < self._redis_down_until:
            return None
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(
                self.redis_url, socket_connect_timeout=min(self.timeout, 0.5), socket_timeout=self.timeout)
        return self._redis

    def _redis_call(self, fn):
        client = self._client()
        if client is None:
            return None
        try:
            return fn(client)
        except Exception:  # Redis down or misbehaving: count in memory for the next 30 s
            self._redis_down_until = time.monotonic() + 30
            return None

    def retry_after(self, email: str, ip: str) -> int:
        """Seconds until this (email, IP) may try again; 0 when it may try now."""
        key = self.key(email, ip)

        def from_redis(r):
            pipe = r.pipeline()
            pipe.get(key)
            pipe.ttl(key)
            count, ttl = pipe.execute()
            return int(count or 0), int(ttl if ttl and ttl > 0 else 0)

        found = self._redis_call(from_redis)
        if found is None:
            with self._lock:
                count, until = self._memory.get(key, (0, 0.0))
                ttl = max(0, int(until - time.monotonic()) + 1) if until > time.monotonic() else 0
                found = (count if ttl else 0, ttl)
        count, ttl = found
        return max(ttl, 1) if count >= self.max_failures else 0

    def failed(self, email: str, ip: str) -> None:
        key = self.key(email, ip)

        def in_redis(r):
            pipe = r.pipeline()
            pipe.set(key, 0, ex=self.window, nx=True)  # starts the window (EXPIRE NX needs Redis 7)
            pipe.incr(key)  # keeps the TTL
            pipe.execute()
            return True

        if self._redis_call(in_redis) is None:
            with self._lock:
                now = time.monotonic()
                count, until = self._memory.get(key, (0, 0.0))
                if until <= now:
                    count, until = 0, now + self.window
                self._memory[key] = (count + 1, until)
                if len(self._memory) > 100_000:  # bound memory under a spray of addresses
                    self._memory = {k: v for k, v in self._memory.items() if v[1] > now}

    def succeeded(self, email: str, ip: str) -> None:
        key = self.key(email, ip)
        self._redis_call(lambda r: r.delete(key))
        with self._lock:
            self._memory.pop(key, None)


# --- spreadsheet safety -----------------------------------------------------------------------

# A cell starting with one of these is run as a formula by spreadsheets (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def looks_like_formula(value: str) -> bool:
    return bool(value) and value.startswith(FORMULA_START)


def neutralise(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with = + - @ tab CR get a `'`."""
    if isinstance(value, str) and looks_like_formula(value):
        return "'" + value
    return value
