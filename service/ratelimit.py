"""Per-key rate limits: a token bucket per key, shared by every worker, so a key's limit holds however the
kernel spreads its connections.

The keys file gives a key a limit with optional fields after its digest, `NAME SHA256 rate=10 burst=20`:
`rate` requests per second on average, `burst` at once (default: the rate, at least 1). A key without them
is not limited. Each bucket is two floats (tokens, last refill) in shared memory under one lock, made by
the process that starts the workers and inherited by them; time.monotonic() is the machine's, the same in
every process. A request over its key's limit is a 429 with Retry-After (the seconds until a token is
back), counted in digitgen_key_throttled_total{key}.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from dataclasses import dataclass
from pathlib import Path

from service.auth import DIGEST, KeyFileError

LOCK_TIMEOUT_S = 0.05
FIELD = re.compile(r"(rate|burst)=([0-9]+(?:\.[0-9]+)?)")


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: float  # the bucket's size


def load_limits(path: Path) -> dict[str, Limit]:
    """{key name: its limit} for the keys the file limits (KeyFileError naming the line of a bad field)."""
    limits = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if len(parts) < 2 or not DIGEST.fullmatch(parts[1].lower()):
            continue  # load_keys names what is wrong with a key's own fields
        fields = {}
        for extra in parts[2:]:
            match = FIELD.fullmatch(extra)
            if not match or float(match.group(2)) <= 0:
                raise KeyFileError(f"{path}:{number}: {extra!r}: expected rate=R (requests per second) or burst=B, "
                                   f"each above 0")
            fields[match.group(1)] = float(match.group(2))
        if "burst" in fields and "rate" not in fields:
            raise KeyFileError(f"{path}:{number}: burst= without rate=")
        if fields.get("burst", 1.0) < 1:
            raise KeyFileError(f"{path}:{number}: burst={fields['burst']:g}: at least 1 (a request takes a whole token)")
        if "rate" in fields:
            limits[parts[0]] = Limit(fields["rate"], fields.get("burst", max(1.0, fields["rate"])))
    return limits


class Buckets:
    """Every limited key's bucket, in memory the workers share (picklable into a spawned process)."""

    def __init__(self, limits: dict[str, Limit]):
        context = multiprocessing.get_context("spawn")
        self.limits, self.index = limits, {name: i for i, name in enumerate(sorted(limits))}
        self.values = context.RawArray("d", 2 * max(1, len(limits)))  # per key: tokens, last refill
        self.lock = context.Lock()
        now = time.monotonic()
        for name, i in self.index.items():
            self.values[2 * i], self.values[2 * i + 1] = limits[name].burst, now

    def take(self, name: str) -> float:
        """0 when the key may go on (a token taken), else the seconds until it may."""
        i = self.index.get(name)
        if i is None:
            return 0.0
        limit = self.limits[name]
        if not self.lock.acquire(timeout=LOCK_TIMEOUT_S):  # a worker killed holding it: let requests through
            return 0.0
        try:
            now = time.monotonic()
            tokens = min(limit.burst, self.values[2 * i] + (now - self.values[2 * i + 1]) * limit.rate)
            self.values[2 * i + 1] = now
            if tokens >= 1.0:
                self.values[2 * i] = tokens - 1.0
                return 0.0
            self.values[2 * i] = tokens
            return (1.0 - tokens) / limit.rate
        finally:
            self.lock.release()
