"""HTTP caching of seeded responses: a request with a seed is a pure function of the model file and the
parameters, so it gets a strong ETag; a revalidation that matches is a 304 answered without touching the
model. Requests without a seed draw a new one each time: no-store.

How long and where a seeded response may be kept (RFC 9111):
- a request that pins a version (`version=`) names an immutable file, so its answer is immutable for a
  year, and its ETag never changes for that URL; one that names only the model (or none) is answered by
  whichever version the manifest serves now, which a reload can change, so it may be reused for a minute
  and then revalidated (a 304 while nothing changed). Every answer names its version (X-Model-Version);
- with API keys on, only the client's own cache may keep it (`private`): a shared cache (a CDN, a
  corporate proxy) must not hand a keyed image to a client without a key.
"""

from __future__ import annotations

import hashlib
import json

PINNED = "max-age=31536000, immutable"  # the version is named: the response never changes
UNPINNED = "max-age=60"  # whichever version is served now answered: a reload may change it
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


def cache_control(pinned: bool, keyed: bool) -> str:
    """Cache-Control of a seeded response."""
    return f"{'private' if keyed else 'public'}, {PINNED if pinned else UNPINNED}"

