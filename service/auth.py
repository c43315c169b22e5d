"""Optional API keys: DIGITGEN_API_KEYS_FILE holds one `NAME SHA256_OF_THE_KEY` per line (`#` comments),
so the file holds no secret. When it is set, every model endpoint needs `Authorization: Bearer KEY` or
`X-API-Key: KEY`; the page, health, readiness, metrics and the API's own documentation stay open.

Keys are compared by their SHA-256, in constant time, against every line (no early exit), and are never
logged; the metrics count requests per key NAME.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from pathlib import Path

from service import errors

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc", "/favicon.ico"})
OPEN_PREFIXES = ("/v2/health/", "/static/")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIGEST = re.compile(r"[0-9a-f]{64}")


class KeyFileError(ValueError):
    """The keys file cannot be used; the message names the file and line."""


def is_open(path: str) -> bool:
    """A path anyone may request, keys on or off (the OpenAPI document's routes included)."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: Path) -> dict[str, str]:
    """{sha256 of a key: its name} from the file."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read the API keys file ({err.strerror})") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()[:2]  # then optional limits, read by service/ratelimit.py
        if len(parts) != 2 or not NAME.fullmatch(parts[0]) or not DIGEST.fullmatch(parts[1].lower()):
            raise KeyFileError(f"{path}:{number}: expected `NAME SHA256_OF_THE_KEY [rate=R] [burst=B]` (a name of "
                               f"letters, digits, ., _ or -, then 64 hex digits); `python -m service keygen NAME` "
                               f"writes one")
        name, hashed = parts[0], parts[1].lower()
        if hashed in keys:
            raise KeyFileError(f"{path}:{number}: the key of {name} is already listed as {keys[hashed]}")
        keys[hashed] = name
    if not keys:
        raise KeyFileError(f"{path}: no keys in the file (an empty file would lock every model endpoint)")
    return keys


def key_name(presented: str, keys: dict[str, str]) -> str | None:
    """The name of the presented key, or None; compares against every entry in constant time."""
    wanted = digest(presented)
    found = None
    for hashed, name in keys.items():
        if hmac.compare_digest(hashed, wanted):
            found = name
    return found


def presented_key(headers: dict[bytes, bytes]) -> str | None:
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


def new_key(name: str) -> tuple[str, str]:
    """A new random key and its line for the keys file."""
    if not NAME.fullmatch(name):
        raise KeyFileError(f"NAME {name!r}: letters, digits, ., _ or - (at most 64)")
    key = secrets.token_urlsafe(32)
    return key, f"{name} {digest(key)}"


class ApiKeys:
    """ASGI middleware: a request for a model endpoint without a valid key is a 401 (the protocol's
    {"error"} shape under /v2, {"detail"} elsewhere) with WWW-Authenticate: Bearer."""

    def __init__(self, app, keys: dict[str, str], counter, buckets=None, throttled=None):
        self.app, self.keys, self.counter, self.buckets, self.throttled = app, keys, counter, buckets, throttled

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = errors.route_path(scope)
        if is_open(path) or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        presented = presented_key(dict(scope["headers"]))
        name = key_name(presented, self.keys) if presented else None
        if name is None:
            why = "a valid API key is required" if presented is None else "the API key is not valid"
            message = f"{why}: send `Authorization: Bearer KEY` or `X-API-Key: KEY`"
            body = errors.encoded(path, message)
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="digit-gen"')]})
            await send({"type": "http.response.body", "body": body})
            return
        self.counter.labels(name).inc()
        wait = self.buckets.take(name) if self.buckets is not None else 0.0
        if wait:
            self.throttled.labels(name).inc()
            limit = self.buckets.limits[name]
            body = errors.encoded(path, f"key {name} is over its limit of {limit.rate:g} requests/s (burst "
                                        f"{limit.burst:g}); retry after {wait:.2f} s")
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(max(1, math.ceil(wait))).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        return await self.app(scope, receive, send)
