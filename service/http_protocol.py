"""The HTTP edge: uvicorn's httptools protocol with bounds on what a client may hold.

uvicorn accepts a request line and headers of any length (the URL buffer grows with every packet: an
endless URL took a worker from 202 to 699 MB), keeps a connection that sends nothing forever, and answers
a request it cannot parse with plain text. This protocol, per connection:
- refuses a request line longer than DIGITGEN_MAX_REQUEST_LINE_BYTES with 414, and headers past
  DIGITGEN_MAX_HEADER_BYTES with 431, as soon as the bytes pass the bound (nothing more is buffered);
- closes, with 408, a connection whose request head has not arrived DIGITGEN_HEADER_TIMEOUT_S after it
  opened or after its previous response (slowloris), and one whose body stalls for DIGITGEN_BODY_TIMEOUT_S
  between two reads;
- answers a new connection past DIGITGEN_MAX_CONNECTIONS per worker with 503 and closes it at once (its
  descriptor comes back, where an idle crowd would exhaust them);
- answers what it cannot parse (a Content-Length that is not a number...) in the service's JSON shape,
  `{"error"}` under /v2.
The workers also raise their open-files limit to its hard limit, so the cap is what binds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import errors

log = logging.getLogger("digitgen.http")

HEAD = "the request head did not arrive within {seconds:g} s (DIGITGEN_HEADER_TIMEOUT_S)"
BODY = "the request body sent nothing for {seconds:g} s (DIGITGEN_BODY_TIMEOUT_S)"
REASONS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long",
           431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class Bounds:
    max_request_line_bytes: int
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


ON_DISCONNECT = "digitgen.on_disconnect"  # in a request's scope: callables run if its client goes
GONE = "digitgen.gone"  # in a request's scope: True once its client went


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request already answered."""


class EdgeProtocol(HttpToolsProtocol):
    bounds: Bounds  # set on the subclass `protocol_for` makes

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._line = self._head = 0
        self._answered = False
        if len(self.connections) > self.bounds.max_connections:
            self._answer(503, f"this worker holds {self.bounds.max_connections} connections "
                              f"(DIGITGEN_MAX_CONNECTIONS); retry shortly", retry_after=True)
            return
        self._arm(self.bounds.header_timeout_s, HEAD)

    def connection_lost(self, exc) -> None:
        self._disarm()
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and not cycle.response_complete:  # the client left before its answer
            cycle.scope[GONE] = True  # type: ignore[literal-required]
            for call in cycle.scope.get(ON_DISCONNECT, ()):  # type: ignore[attr-defined]
                call()

    def data_received(self, data: bytes) -> None:
        """uvicorn's, but what cannot be parsed is answered in the service's shape, at debug level: a client
        sending garbage must not flood the log."""
        if self._answered:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as err:  # our own refusals (_Refused) are answered already
            if not self._answered:
                log.debug("unparseable request from %s: %s", self.client, err)
                self._answer(400, f"the request cannot be parsed as HTTP/1.1: {err}")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._line = self._head = 0
        self._arm(self.bounds.header_timeout_s, HEAD)

    def on_url(self, url: bytes) -> None:
        self._line += len(url)
        if self._line > self.bounds.max_request_line_bytes:
            self._answer(414, f"the request line is longer than {self.bounds.max_request_line_bytes} bytes "
                              f"(DIGITGEN_MAX_REQUEST_LINE_BYTES)")
            raise _Refused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head += len(name) + len(value) + 4
        if self._head > self.bounds.max_header_bytes:
            self._answer(431, f"the headers are larger than {self.bounds.max_header_bytes} bytes "
                              f"(DIGITGEN_MAX_HEADER_BYTES)")
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.scope[ON_DISCONNECT] = []  # type: ignore[literal-required]
        super().on_headers_complete()
        self._arm(self.bounds.body_timeout_s, BODY)  # disarmed once the body is in

    def on_body(self, body: bytes) -> None:
        self._arm(self.bounds.body_timeout_s, BODY)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
            # answered before its body was all in (a 401, a 404): uvicorn armed its keep-alive timer then, and
            # the rest of the body cancelled it; without this the connection would hold no timer at all
            self._arm(self.bounds.header_timeout_s, HEAD)

    def send_400_response(self, msg: str) -> None:
        if not self._answered:
            self._answer(400, f"the request cannot be parsed as HTTP/1.1: {msg}")

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out, why, seconds)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self, why: str, seconds: float) -> None:
        self._timer = None
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body is False:
            self._arm(seconds, why)  # a request is in and being answered: look again after it
            return
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's receive() sees the client gone
            self.cycle.message_event.set()
        self._answer(408, why.format(seconds=seconds))

    def _answer(self, status: int, message: str, retry_after: bool = False) -> None:
        """Answer with `status` in the service's JSON shape and close the connection. While an earlier
        request's response is still being made (pipelining), nothing is written ahead of it: the connection
        closes once that response is sent, the refused request unanswered."""
        self._answered = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body is False:
            self.cycle.keep_alive = False
            return
        path = self.url.split(b"?", 1)[0].decode("latin-1") if getattr(self, "url", None) else "/"
        body = json.dumps(errors.body(path, message)).encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]), b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
        if retry_after:
            head.append(b"retry-after: 1\r\n")
        if not self.transport.is_closing():
            self.transport.write(b"".join(head) + b"\r\n" + body)
            self.transport.close()


def protocol_for(bounds: Bounds) -> type[EdgeProtocol]:
    """The protocol class uvicorn instantiates per connection, with these bounds."""
    return type("DigitGenProtocol", (EdgeProtocol,), {"bounds": bounds})


def uvicorn_options(options: dict) -> dict:
    """uvicorn.Config's options with the `bounds` (a Bounds: plain values cross to a spawned worker, a class
    made at run time would not) turned into the protocol class; the open-files limit raised."""
    options = dict(options)
    bounds = options.pop("bounds", None)
    if bounds is not None:
        options["http"] = protocol_for(bounds)
        raise_open_files_limit()
    return options


def raise_open_files_limit() -> int:
    """The soft open-files limit raised to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
        except (ValueError, OSError):
            pass
    return soft
