"""The HTTP edge (service/http_protocol.py, service/dispatch.py): bounded request lines and headers, head
and body timeouts, a connection cap, the service's JSON shape for what cannot be parsed, and clients that
leave: no 500, no log line, no work done for them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_port, wait_until
from onnx_fixtures import write_models_dir


def exchange(port: int, request: bytes, wait_s: float = 5.0) -> tuple[bytes, float]:
    """What the service answers to `request` (bytes, sent at once), until it closes; and how long that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait_s)
        if request:
            try:
                sock.sendall(request)
            except OSError:  # it closed while we sent: what it answered is what counts
                pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    return data, time.monotonic() - started


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """`python -m service` with short timeouts and a small connection cap; its port and its log."""
    folder = tmp_path_factory.mktemp("edge")
    write_models_dir(folder)
    port, log = free_port(), folder / "service.log"
    env = os.environ | {"DIGITGEN_HEADER_TIMEOUT_S": "1", "DIGITGEN_BODY_TIMEOUT_S": "1", "DIGITGEN_MAX_CONNECTIONS": "30",
                        "DIGITGEN_LOG_LEVEL": "info"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--workers", "1",
                                    "--models-dir", str(folder)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200
            except OSError:
                return False
        wait_until(ready, "the service never became ready", 120)
        yield port, log, process
    finally:
        process.terminate()
        process.wait(30)


def rss_bytes(pid: int) -> int:
    return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_an_endless_request_line_is_a_414_at_the_bound_and_holds_no_memory(edge):
    port, _, process = edge
    before = rss_bytes(process.pid)
    answer, _ = exchange(port, b"GET /sample?x=" + b"a" * 20_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414 ") and b'"the request line is longer than 8192 bytes' in answer
    assert rss_bytes(process.pid) - before < 20 * 2**20  # 20 MB sent; not buffered


def test_oversized_headers_are_a_431(edge):
    port, _, _ = edge
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"b" * 1000) for i in range(40))
    answer, _ = exchange(port, b"GET /sample HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"DIGITGEN_MAX_HEADER_BYTES" in answer


def test_a_request_that_cannot_be_parsed_is_answered_in_the_protocols_shape(edge):
    port, log, _ = edge
    v2, _ = exchange(port, b"POST /v2/models/gan/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert v2.startswith(b"HTTP/1.1 400 ") and b'{"error": "the request cannot be parsed' in v2
    plain, _ = exchange(port, b"GET /sample HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert plain.startswith(b"HTTP/1.1 400 ") and b'{"detail": ' in plain
    assert b"application/json" in plain and "Invalid HTTP request received" not in log.read_text()


@pytest.mark.parametrize("request_bytes, setting", [
    (b"", b"DIGITGEN_HEADER_TIMEOUT_S"),                                       # connects, says nothing
    (b"GET /sample HTTP/1.1\r\nHost: x\r\n", b"DIGITGEN_HEADER_TIMEOUT_S"),     # a head never finished
    (b"POST /v2/models/gan/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{", b"DIGITGEN_BODY_TIMEOUT_S"),
])
def test_slow_clients_are_answered_408_and_closed(edge, request_bytes, setting):
    port, _, _ = edge
    answer, took = exchange(port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 408 ") and setting in answer and 0.9 < took < 3


def test_connections_past_the_cap_are_refused_at_once_and_the_rest_serve(edge):
    port, _, _ = edge
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(35)]
    try:
        time.sleep(0.2)
        answer, took = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer and took < 1
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200


def test_aborted_uploads_are_counted_499_and_never_logged(edge):
    port, log, _ = edge
    for _ in range(20):  # a body promised, a tenth of it sent, then gone
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v2/models/gan/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b'{"inputs": [' + b" " * 90)
    time.sleep(0.5)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'status="500"' not in metrics
    assert "Traceback" not in log.read_text() and "ClientDisconnect" not in log.read_text()


def test_a_queued_request_whose_client_left_is_dropped_before_it_runs(tmp_path):
    """Batches wait a second to fill (DIGITGEN_BATCH_MAX_WAIT_MS): a client that asks and leaves within it
    is counted 499 and its job never runs (no batch reaches the model)."""
    from conftest import running_service
    write_models_dir(tmp_path)
    with running_service(tmp_path, batch_max_wait_ms="1000") as service:
        port = int(service.url.rsplit(":", 1)[1])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET /generate?digit=3&model=cgan&n=1 HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.2)
        time.sleep(1.5)
        metrics = urllib.request.urlopen(service.url + "/metrics", timeout=5).read().decode()
    assert 'digitgen_requests_total{endpoint="/generate",status="499"} 3.0' in metrics, metrics[:2000]
    import re
    batches = re.findall(r'digitgen_inference_batch_size_count\{model="cgan",version="\w+"\} (\S+)', metrics)
    assert batches in ([], ["0.0"]), batches  # no batch of cgan ever ran


def test_a_connection_answered_before_its_body_was_in_still_times_out(edge):
    """A 405 answered before the body the headers promised; then the rest of the body: the connection must
    still hold a timer (uvicorn's keep-alive timer was cancelled by those bytes) and close."""
    port, _, _ = edge
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"PUT /models HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        time.sleep(0.3)
        sock.sendall(b"67890")
        started, received = time.monotonic(), b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
    assert received.startswith(b"HTTP/1.1 405 ") and time.monotonic() - started < 3.5


def test_the_access_line_escapes_what_the_client_sent():
    import logging

    from service import logs
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logs.access.addHandler(handler)
    level = logs.access.level
    logs.access.setLevel(logging.INFO)
    try:
        logs.log_request({"request_id": "r1"}, "GET", "/sample\n2026 INFO forged", 200, 0.001, ("1.2.3.4", 5))
    finally:
        logs.access.removeHandler(handler)
        logs.access.setLevel(level)
    line = records[0].getMessage()
    assert "\n" not in line and "path=/sample\\n2026\\x20INFO\\x20forged" in line
