"""HTTP caching of seeded responses: a request with a seed is a pure function of the model file and the
parameters, so it gets a strong ETag and may be cached for a year; a revalidation that matches is a 304
answered without touching the model. Requests without a seed draw a new one each time: no-store.
"""

from __future__ import annotations

import hashlib
import json

SEEDED = "public, max-age=31536000, immutable"
UNSEEDED = "no-store"
# Part of every ETag: a change to how a seed becomes z or how images are encoded must change the tags.
ENCODING_VERSION = "1"


def etag(model_sha256: str, endpoint: str, params: dict) -> str:
    """A strong ETag from the model file's sha256 and the normalised parameters (defaults filled in, the
    model named), so equal requests written differently share one tag."""
    text = json.dumps({"model": model_sha256, "endpoint": endpoint, "params": params, "v": ENCODING_VERSION},
                      sort_keys=True, separators=(",", ":"))
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """Does If-None-Match name this tag? (RFC 9110: weak comparison, a list, or *.)"""
    if not if_none_match:
        return False
    candidates = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in candidates or tag in candidates


def headers(tag: str | None) -> dict[str, str]:
    return {"ETag": tag, "Cache-Control": SEEDED} if tag else {"Cache-Control": UNSEEDED}
