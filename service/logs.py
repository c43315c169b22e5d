"""The service's log lines: text (the default) or one JSON object per line (DIGITGEN_LOG_FORMAT=json), and
in both the process that wrote them: `supervisor`, `worker-N` (its slot: a replacement keeps the number)
or `inference`, with its pid. uvicorn's own loggers go through the same handler.

The access log (DIGITGEN_ACCESS_LOG=on) is the service's own, not uvicorn's: one line per request with its
request id (the client's X-Request-ID when it sends a usable one, else made; returned in X-Request-ID),
method, path, status, latency and, for a model's request, the model, version and queue wait
(service/middleware.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import sys
import time
from contextvars import ContextVar

# What a request's access line gathers on its way (request_id; a model's route adds model, version and the
# job whose queue wait it reports): set by the middleware, filled by service/dispatch.py.
request_context: ContextVar[dict | None] = ContextVar("digitgen_request", default=None)
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")  # a client's X-Request-ID that may be echoed
access = logging.getLogger("digitgen.access")
_PREFIX, _COUNT = secrets.token_hex(4), itertools.count()

TEXT = "%(asctime)s %(levelname)s %(who)s %(name)s: %(message)s"
RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "who"}


class _Who(logging.Filter):
    """Adds `who` (the process's role and pid) to every record."""

    def __init__(self, role: str):
        super().__init__()
        self.who = f"{role}[{os.getpid()}]"
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.who, record.role = self.who, self.role
        if record.name == "uvicorn.error":  # uvicorn's general logger: its name is no error
            record.name = "uvicorn"
        return True


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, worker, pid, and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                "worker": getattr(record, "role", None), "pid": record.process}
        line |= {key: value for key, value in vars(record).items() if key not in RESERVED and key != "role"}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def request_id(headers) -> str:
    """The client's X-Request-ID when it is usable (at most 128 of letters, digits and ._:/+=@-), else a new
    one: this process's random prefix and a count, unique across workers and restarts without a system call
    per request (secrets.token_hex cost the request path 35 us a request: tests/benchmarks/request_path.py)."""
    for name, value in headers:
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
            return value.decode()
    return f"{_PREFIX}{next(_COUNT):08x}"


def log_request(context: dict, method: str, path: str, status: int, seconds: float, client) -> None:
    """The access line: text, or its fields in a JSON line."""
    fields = {"request_id": context["request_id"], "method": method, "path": path, "status": status,
              "latency_ms": round(1000 * seconds, 3), "client": client[0] if client else None}
    if "model" in context:
        fields |= {"model": context["model"], "version": context["version"]}
        job = context.get("job")
        if job is not None and job.started:
            fields["queue_wait_ms"] = round(1000 * (job.started - job.enqueued), 3)
    # the path as the client sent it may hold anything (uvicorn decodes %0A): escaped, it cannot forge a line
    text = " ".join(f"{key}={_escaped(value)}" for key, value in fields.items() if value is not None)
    access.info(text, extra=fields)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (not the one at creation)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def _escaped(value) -> str:
    return value.encode("unicode_escape").decode("ascii").replace(" ", "\\x20") if isinstance(value, str) else str(value)


def configure(level: str, form: str, role: str) -> None:
    """The root logger of this process: `form` text or json, every line naming `role` and the pid. Called
    again, it replaces the handler it added before (and leaves others, a test runner's, alone)."""
    handler = _Stderr()
    handler.setFormatter(JsonLines() if form == "json" else logging.Formatter(TEXT))
    handler.addFilter(_Who(role))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
