"""Plain ASGI middleware (BaseHTTPMiddleware costs a task and a stream per request): request metrics, the
body limit that refuses an oversized request before anything reads it, and the hot routes' dispatch."""

from __future__ import annotations

import logging
import time

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service import errors, logs
from service.metrics import Metrics

log = logging.getLogger("digitgen.http")
NOT_IN_FLIGHT = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})  # probes, scrapes


class RequestMetrics:
    """The outermost layer: counts requests and their latency by route and status; answers HEAD as GET
    without the body (monitors probe with HEAD); gives every response a Cache-Control (`no-store` where
    the route set none), so no cache guesses."""

    def __init__(self, app, metrics: Metrics, access_log: bool = False):
        self.app, self.metrics, self.access_log = app, metrics, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        method = scope["method"]
        head = method == "HEAD"
        if head:
            scope = dict(scope, method="GET")
        request_id = logs.request_id(scope["headers"])
        request_header = (b"x-request-id", request_id.encode())
        context = {"request_id": request_id} if self.access_log else None  # what the access line gathers
        token = logs.request_context.set(context) if context is not None else None

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), request_header]
                if not any(name == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = dict(message, headers=headers)
            elif head and message["type"] == "http.response.body":
                message = dict(message, body=b"")
            await send(message)

        counted = scope["path"] not in NOT_IN_FLIGHT
        if counted:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if counted:
                self.metrics.in_flight.dec()
            if token is not None:
                logs.request_context.reset(token)
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(seconds)
            if context is not None:
                logs.log_request(context, method, scope["path"], status, seconds, scope.get("client"))


class BodyTooLarge(errors.ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this service's limit, {limit} bytes "
                              f"(DIGITGEN_MAX_BODY_BYTES)")


class BodyLimit:
    """A body over the served model set's `max_body_bytes` is a 413: at once by its Content-Length, else
    (chunked) as soon as the bytes read pass the limit, before the route parses any of it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):  # routes that never read a body
            return await self.app(scope, receive, send)
        limit = scope["app"].state.models.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            err = BodyTooLarge(limit) if length.isdigit() else errors.ApiError(400, "Content-Length is not a number")
            return await _answer(scope, send, err)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # the route's read fails; the app's handler answers 413
            return message

        await self.app(scope, counting_receive, send)


async def _answer(scope, send, err: errors.ApiError) -> None:
    body = errors.encoded(errors.route_path(scope), err.message)
    await send({"type": "http.response.start", "status": err.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class HotRoutes:
    """The busiest routes (images, V2 infer) dispatched straight to their handlers, skipping FastAPI's
    match against every route, its dependency solving and its per-request exit stacks: each handler takes
    only the request (and path parameters) and validates by itself, so nothing is lost. The routes stay
    registered with FastAPI, for the OpenAPI document and as the path for everything else."""

    def __init__(self, app, routes: list):
        self.app = app
        self.exact = {(method, r.path): r for r in routes if "{" not in r.path for method in r.methods}
        self.patterned = [(method, r) for r in routes if "{" in r.path for method in r.methods]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = errors.route_path(scope)
        route, params = self.exact.get((scope["method"], path)), {}
        if route is None:
            for method, candidate in self.patterned:
                found = method == scope["method"] and candidate.path_regex.match(path)
                if found:
                    route, params = candidate, found.groupdict()
                    break
        if route is None:
            return await self.app(scope, receive, send)
        scope["route"], scope["path_params"] = route, params
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request, **params)
        except errors.ApiError as err:
            response = errors.error_response(request, err)
        except HTTPException as err:
            response = JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=err.headers)
        except ClientDisconnect as err:  # the client left while its body was read: nobody to answer, nothing to log
            response = errors.client_gone(request, err)
        except Exception as err:  # a bug, not a client's mistake: logged, and answered in the endpoint's shape
            log.exception("%s %s failed", scope["method"], path)
            response = errors.error_response(request, errors.ApiError(500, f"internal error: {type(err).__name__}"))
        await response(scope, receive, send)
