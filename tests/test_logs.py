"""service/logs.py: every line names its process; the access log, text or JSON, carries the request id,
the model, its version, the latency and the queue wait; X-Request-ID is taken from the client or made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from conftest import free_port, wait_until
from fastapi.testclient import TestClient
from onnx_fixtures import write_models_dir

from service.app import create_app
from service.config import Settings


def test_a_request_id_is_taken_from_the_client_or_made_and_always_returned(tmp_path):
    write_models_dir(tmp_path)
    with TestClient(create_app(Settings(models_dir=tmp_path, intra_op_threads=1), warm=False)) as client:
        given = client.get("/sample", params={"seed": 1}, headers={"X-Request-ID": "trace-42:a/b"})
        assert given.headers["x-request-id"] == "trace-42:a/b"
        made = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
        assert len(made) == 3 and all(len(m) == 16 for m in made)
        unusable = client.get("/healthz", headers={"X-Request-ID": "x" * 200})
        assert len(unusable.headers["x-request-id"]) == 16  # too long to echo: a new one


def test_json_logs_name_the_worker_and_give_each_request_its_fields(tmp_path):
    """Two workers, DIGITGEN_LOG_FORMAT=json and the access log on: every line is one JSON object naming its
    process; a model's request line holds its id, model, version, status, latency and queue wait."""
    write_models_dir(tmp_path)
    port = free_port()
    env = os.environ | {"DIGITGEN_LOG_FORMAT": "json", "DIGITGEN_ACCESS_LOG": "on", "DIGITGEN_LOG_LEVEL": "info"}
    log = tmp_path / "service.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--workers", "2",
                                    "--models-dir", str(tmp_path)], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def answers() -> bool:
            try:
                return urllib.request.urlopen(url + "/readyz", timeout=1).status == 200
            except OSError:
                return False
        wait_until(answers, "the service never became ready", 120)
        request = urllib.request.Request(url + "/generate?digit=3&seed=5&model=cgan", headers={"X-Request-ID": "abc-1"})
        with urllib.request.urlopen(request, timeout=10) as response:
            version = response.headers["X-Model-Version"]
        time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(30)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    assert {line["worker"] for line in lines} >= {"supervisor", "worker-0", "worker-1"}
    assert all(isinstance(line["pid"], int) and line["level"] and line["time"].endswith("Z") for line in lines)
    started = next(line for line in lines if line["message"].startswith("digit-gen "))
    assert started["worker"] == "supervisor" and f":{port} with 2 worker(s)" in started["message"]
    access = [line for line in lines if line["logger"] == "digitgen.access" and line.get("request_id") == "abc-1"]
    assert len(access) == 1, lines[-5:]
    line = access[0]
    assert (line["method"], line["path"], line["status"], line["model"], line["version"]) == \
        ("GET", "/generate", 200, "cgan", version)
    assert line["latency_ms"] > 0 and 0 <= line["queue_wait_ms"] < line["latency_ms"]
    assert line["worker"] in ("worker-0", "worker-1")


def test_text_logs_name_the_process_in_every_line(tmp_path, capfd):
    import logging

    from service import logs
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        logs.configure("info", "text", "worker-3")
        assert all(h in root.handlers for h in saved[0] if not isinstance(h, logs._Stderr))  # a test runner's stay
        logging.getLogger("digitgen.test").info("hello")
    finally:
        for handler in [h for h in root.handlers if h not in saved[0]]:
            root.removeHandler(handler)
        for handler in saved[0]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved[1])
    assert f"worker-3[{os.getpid()}] digitgen.test: hello" in capfd.readouterr().err
