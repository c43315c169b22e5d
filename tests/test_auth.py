"""Optional API keys (DIGITGEN_API_KEYS_FILE): who needs one, the 401, the key file, keygen."""

from __future__ import annotations

import logging
import math
import time

import pytest
from conftest import wait_ready
from fastapi.testclient import TestClient
from onnx_fixtures import write_models_dir

from service.__main__ import main as service_cli
from service.app import create_app
from service.auth import KeyFileError, load_keys, new_key
from service.config import Settings

KEY, LINE = new_key("frontend")
Z8 = {"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    write_models_dir(folder / "exported")
    keys = folder / "keys.txt"
    other_key, other_line = new_key("batch-jobs")
    keys.write_text(f"# who may call the model endpoints\n{LINE}\n\n{other_line}  # nightly\n")
    settings = Settings(models_dir=folder / "exported", intra_op_threads=1, api_keys_file=keys,
                        cors_origins=["http://frontend.test"])
    with TestClient(create_app(settings)) as client:
        yield wait_ready(client)


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/sample?model=gan", None), ("GET", "/generate?digit=1", None), ("GET", "/interpolate", None),
    ("GET", "/models", None), ("GET", "/models/gan", None), ("GET", "/v2", None), ("GET", "/v2/models/gan", None),
    ("POST", "/v2/models/gan/infer", Z8),
])
def test_model_endpoints_need_a_key(client, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY + "x"}, {"Authorization": KEY}):
        refused = client.request(method, path, json=body, headers=headers)
        assert refused.status_code == 401, (path, headers)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        message = refused.json()["error" if path.startswith("/v2") else "detail"]  # the protocol's shape
        assert "API key" in message and KEY not in message
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        assert client.request(method, path, json=body, headers=headers).status_code == 200, (path, headers)


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready",
                                  "/openapi.json"])
def test_health_metrics_and_the_page_stay_open(client, path):
    assert client.get(path).status_code == 200


def test_a_cors_preflight_passes_without_a_key_and_a_browser_can_read_the_401(client):
    preflight = client.options("/sample", headers={"Origin": "http://frontend.test",
                                                   "Access-Control-Request-Method": "GET",
                                                   "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = client.get("/sample", headers={"Origin": "http://frontend.test"})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "http://frontend.test"


def test_metrics_count_requests_per_key_name_never_the_key(client, caplog):
    def counted() -> float:
        text = client.get("/metrics").text
        assert KEY not in text
        lines = [line for line in text.splitlines() if line.startswith('digitgen_key_requests_total{key="frontend"}')]
        return float(lines[0].split()[-1]) if lines else 0.0
    before = counted()
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            assert client.get("/sample", params={"model": "gan"}, headers={"X-API-Key": KEY}).status_code == 200
    assert counted() - before == 3
    assert KEY not in caplog.text


@pytest.mark.parametrize("params, cache_control", [
    ({"model": "gan", "seed": 4, "version": "pinned"}, "private, max-age=31536000, immutable"),
    ({"model": "gan", "seed": 4}, "private, max-age=60"),  # the version served now: a reload may change it
    ({"seed": 4}, "private, max-age=60"),  # the default model likewise
])
def test_keyed_seeded_responses_are_private_so_no_shared_cache_keeps_them(client, params, cache_control):
    if params.get("version") == "pinned":
        params = params | {"version": client.app.state.models.models["gan"].entry.version}
    first = client.get("/sample", params=params, headers={"X-API-Key": KEY})
    assert first.status_code == 200 and first.headers["cache-control"] == cache_control
    again = client.get("/sample", params=params, headers={"X-API-Key": KEY, "If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.headers["cache-control"] == cache_control


def test_the_keys_file_holds_hashes_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "keys.txt"
    good.write_text(LINE + "\n")
    assert load_keys(good) == {LINE.split()[1]: "frontend"}
    assert KEY not in good.read_text()
    for text, problem in ((f"frontend {KEY}\n", ":1: expected `NAME SHA256_OF_THE_KEY"),
                          ("# nothing\n", "no keys in the file"),
                          (f"{LINE}\n{LINE.replace('frontend', 'again')}\n", ":2: the key of again is already")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(KeyFileError, match=problem):
            load_keys(bad)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_keys(tmp_path / "missing.txt")


def test_the_service_refuses_to_start_with_a_bad_keys_file(tmp_path, monkeypatch, capsys):
    write_models_dir(tmp_path / "exported")
    (tmp_path / "keys.txt").write_text("just-a-name\n")
    monkeypatch.setenv("DIGITGEN_API_KEYS_FILE", str(tmp_path / "keys.txt"))
    assert service_cli(["--models-dir", str(tmp_path / "exported")]) == 2
    assert "keys.txt:1: expected" in capsys.readouterr().err


def test_keygen_prints_a_key_and_the_line_that_admits_it(capsys, tmp_path):
    assert service_cli(["keygen", "dashboard"]) == 0
    out = capsys.readouterr().out
    key = out.split("key:")[1].split()[0]
    line = out.split("line:")[1].splitlines()[0].strip()
    (tmp_path / "keys.txt").write_text(line + "\n")
    from service.auth import key_name
    assert key_name(key, load_keys(tmp_path / "keys.txt")) == "dashboard" and key not in line


def test_the_docs_are_served_from_the_package_and_declare_how_to_send_a_key(tmp_path):
    """With keys on: /docs and its assets stay open; the OpenAPI document declares both ways of sending a
    key on every route that needs one (Swagger UI's Authorize button then works), none on the open ones."""
    from fastapi.testclient import TestClient
    from onnx_fixtures import write_models_dir

    from service.app import create_app
    from service.auth import new_key
    from service.config import Settings
    write_models_dir(tmp_path)
    key, line = new_key("docs")
    (tmp_path / "keys.txt").write_text(line + "\n")
    with TestClient(create_app(Settings(models_dir=tmp_path, intra_op_threads=1, api_keys_file=tmp_path / "keys.txt"),
                               warm=False)) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "/static/swagger-ui/swagger-ui-bundle.js" in page.text
        assert "cdn" not in page.text.lower()
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert client.get(f"/static/swagger-ui/{asset}").status_code == 200
        schema = client.get("/openapi.json").json()
        assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        assert schema["paths"]["/sample"]["get"]["security"] == [{"bearer": []}, {"apiKey": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]
        assert "401" in schema["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
        moved = client.get("/redoc", follow_redirects=False)
        assert moved.status_code == 308 and moved.headers["location"] == "/docs"


def limited_keys(tmp_path, rate: str = "rate=2 burst=3"):
    from service.auth import new_key
    fast, fast_line = new_key("fast")
    slow, slow_line = new_key("slow")
    (tmp_path / "keys.txt").write_text(f"{fast_line}\n{slow_line} {rate}\n")
    return fast, slow


def test_a_key_over_its_rate_limit_gets_a_429_with_retry_after_and_others_go_on(tmp_path):
    from fastapi.testclient import TestClient
    from onnx_fixtures import write_models_dir

    from service.app import create_app
    from service.config import Settings
    write_models_dir(tmp_path)
    fast, slow = limited_keys(tmp_path)
    settings = Settings(models_dir=tmp_path, intra_op_threads=1, api_keys_file=tmp_path / "keys.txt")
    with TestClient(create_app(settings, warm=False)) as client:
        answers = [client.get("/healthz", headers={"X-API-Key": slow}) for _ in range(1)]  # open: never limited
        statuses = [client.get("/sample", params={"seed": 1}, headers={"X-API-Key": slow}).status_code
                    for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]  # the burst of 3, then the rate
        refused = client.get("/v2/models/gan", headers={"X-API-Key": slow})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "key slow is over its limit of 2 requests/s" in refused.json()["error"]
        assert all(client.get("/sample", headers={"Authorization": f"Bearer {fast}"}).status_code == 200
                   for _ in range(10))  # a key without a limit
        time.sleep(0.6)  # a token back at 2/s
        assert client.get("/sample", headers={"X-API-Key": slow}).status_code == 200
        assert 'digitgen_key_throttled_total{key="slow"}' in client.get("/metrics").text
        assert answers[0].status_code == 200


def test_a_limit_holds_across_workers(tmp_path):
    """Two workers share one bucket per key: 20 requests over fresh connections in well under a second get
    the burst and about the rate, not twice that."""
    import urllib.error
    import urllib.request

    from conftest import running_service
    from onnx_fixtures import write_models_dir
    write_models_dir(tmp_path)
    _, slow = limited_keys(tmp_path, "rate=1 burst=4")
    ok = 0
    with running_service(tmp_path, workers=2, api_keys_file=str(tmp_path / "keys.txt")) as service:
        started = time.monotonic()
        for _ in range(20):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{service.url}/models", headers={"X-API-Key": slow}))
                ok += 1
            except urllib.error.HTTPError as err:
                assert err.code == 429
        elapsed = time.monotonic() - started
    assert 4 <= ok <= 4 + math.ceil(elapsed) + 1, (ok, elapsed)


@pytest.mark.parametrize("extra, message", [("rate=0", "rate=0"), ("speed=3", "speed=3"), ("burst=2", "burst= without"),
                                            ("rate=1 burst=0.5", "burst=0.5: at least 1")])
def test_a_bad_limit_is_named_by_its_line(tmp_path, extra, message):
    from service.auth import new_key
    from service.ratelimit import load_limits
    _, line = new_key("k")
    (tmp_path / "keys.txt").write_text(f"# keys\n{line} {extra}\n")
    with pytest.raises(KeyFileError, match=f"keys.txt:2: .*{message}"):
        load_limits(tmp_path / "keys.txt")
