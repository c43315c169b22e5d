"""The HTTP API over tiny ONNX fixtures: every endpoint and format, determinism, errors, readiness,
models left out at startup, provider choice and CORS."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import sys
import time

import numpy as np
import pytest
from conftest import free_port, imports_of, unversioned, wait_ready
from fastapi.testclient import TestClient
from onnx_fixtures import write_models_dir
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.modelset import Loader, open_set
from service.providers import CPU, CUDA, choose_providers


@pytest.fixture
def models_dir(tmp_path):
    write_models_dir(tmp_path / "exported")
    return tmp_path / "exported"


@pytest.fixture
def client(models_dir):
    settings = Settings(models_dir=models_dir, intra_op_threads=1, cors_origins=["http://frontend.test"])
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        yield client


def _wait_ready(client):
    wait_ready(client)


def png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def detail_names(response, param: str) -> bool:
    return param in json.dumps(response.json()["detail"])


# --- images and formats ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, nrow, scale, size", [
    (1, 8, 1, (28, 28)), (16, 8, 2, (8 * 56, 2 * 56)), (5, 2, 3, (2 * 84, 3 * 84)), (64, 64, 1, (64 * 28, 28))])
def test_sample_png_grid_has_the_size_n_nrow_and_scale_imply(client, n, nrow, scale, size):
    image = png(client.get("/sample", params={"n": n, "nrow": nrow, "scale": scale, "seed": 1}))
    assert image.size == size and image.mode == "L"


def test_generate_json_holds_one_decodable_png_per_image(client):
    body = client.get("/generate", params={"digit": 3, "n": 4, "format": "json", "seed": 9, "scale": 2}).json()
    assert (body["model"], body["seed"], body["digit"], body["width"], body["height"]) == ("cgan", 9, 3, 56, 56)
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in body["images"]]
    assert len(images) == 4 and all(i.size == (56, 56) for i in images)


def test_same_seed_gives_identical_bytes_and_a_new_seed_differs(client):
    params = {"digit": 7, "n": 8, "seed": 42}
    first, again = client.get("/generate", params=params), client.get("/generate", params=params)
    assert first.content == again.content and first.headers["x-seed"] == "42"
    assert client.get("/generate", params=params | {"seed": 43}).content != first.content


def test_without_a_seed_one_is_drawn_and_returned_and_reproduces_the_image(client):
    first = client.get("/sample", params={"n": 2})
    seed = int(first.headers["x-seed"])
    assert client.get("/sample", params={"n": 2, "seed": seed}).content == first.content
    assert isinstance(client.get("/sample", params={"format": "json"}).json()["seed"], int)


def test_conditional_sample_draws_and_reports_random_classes(client):
    body = client.get("/sample", params={"model": "cgan", "n": 20, "seed": 3, "format": "json"}).json()
    assert len(body["digits"]) == 20 and len(set(body["digits"])) > 1


def test_generate_images_depend_on_the_digit(client):
    three = client.get("/generate", params={"digit": 3, "seed": 5}).content
    assert client.get("/generate", params={"digit": 4, "seed": 5}).content != three


def test_interpolate_gif_has_one_frame_per_step(client):
    response = client.get("/interpolate", params={"steps": 12, "format": "gif", "seed": 1, "scale": 2})
    assert response.headers["content-type"] == "image/gif"
    gif = Image.open(io.BytesIO(response.content))
    assert gif.n_frames == 12 and gif.size == (56, 56)


def test_interpolate_png_is_a_strip_and_json_lists_the_frames(client):
    assert png(client.get("/interpolate", params={"steps": 5, "seed": 1})).size == (5 * 28, 28)
    body = client.get("/interpolate", params={"steps": 6, "seed": 1, "format": "json"}).json()
    assert len(body["images"]) == 6 and body["seed_to"] == 2 and body["method"] == "slerp"


def test_class_blend_keeps_z_and_ends_on_each_digit(client):
    walk = client.get("/interpolate", params={"digit": 2, "digit_to": 5, "steps": 4, "seed": 11,
                                              "format": "json"}).json()
    assert walk["seed_to"] == 11 and (walk["digit"], walk["digit_to"]) == (2, 5)
    for frame, digit in ((walk["images"][0], 2), (walk["images"][-1], 5)):
        single = client.get("/generate", params={"digit": digit, "seed": 11, "format": "json"}).json()
        assert frame == single["images"][0]


def test_slerp_and_linear_walks_share_their_ends_only(client):
    params = {"model": "gan", "steps": 5, "seed": 1, "seed_to": 9, "format": "json"}
    slerp = client.get("/interpolate", params=params).json()["images"]
    linear = client.get("/interpolate", params=params | {"method": "linear"}).json()["images"]
    assert slerp[0] == linear[0] and slerp[-1] == linear[-1] and slerp[2] != linear[2]


def test_first_frame_of_a_walk_is_the_first_sample_of_its_seed(client):
    walk = client.get("/interpolate", params={"model": "gan", "seed": 8, "format": "json"}).json()
    sample = client.get("/sample", params={"model": "gan", "seed": 8, "format": "json"}).json()
    assert walk["images"][0] == sample["images"][0]


def test_truncation_scales_z_toward_the_mean_and_is_reported(client, models_dir):
    import onnxruntime as ort

    from service import imaging, sampling
    response = client.get("/sample", params={"model": "gan", "n": 3, "seed": 4, "truncation": 0.5, "format": "json"})
    assert response.headers["x-truncation"] == "0.5" and response.json()["truncation"] == 0.5
    session = ort.InferenceSession(str(models_dir / "gan.onnx"), providers=["CPUExecutionProvider"])
    z = sampling.latents(4, 3, 8) * np.float32(0.5)
    expected = imaging.to_uint8(session.run(["image"], {"z": z})[0])
    got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in response.json()["images"]])
    np.testing.assert_array_equal(got, expected)
    full = client.get("/sample", params={"model": "gan", "n": 3, "seed": 4})
    assert full.headers["x-truncation"] == "1.0" and full.content != client.get(
        "/sample", params={"model": "gan", "n": 3, "seed": 4, "truncation": 0.5}).content


def test_truncation_applies_to_both_ends_of_a_walk(client):
    walk = client.get("/interpolate", params={"model": "gan", "seed": 8, "seed_to": 9, "steps": 3,
                                              "truncation": 0.7, "format": "json"}).json()
    for frame, seed in ((walk["images"][0], 8), (walk["images"][-1], 9)):
        single = client.get("/sample", params={"model": "gan", "seed": seed, "truncation": 0.7, "format": "json"})
        assert frame == single.json()["images"][0]
    assert walk["truncation"] == 0.7


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, params, param", [
    ("/generate", {"digit": 10}, "digit"),
    ("/generate", {"digit": -1}, "digit"),
    ("/generate", {}, "digit"),
    ("/generate", {"digit": 1, "model": "gan"}, "model"),
    ("/sample", {"n": 0}, "n"),
    ("/sample", {"n": 65}, "n"),
    ("/sample", {"scale": 9}, "scale"),
    ("/sample", {"scale": 0}, "scale"),
    ("/sample", {"nrow": 0}, "nrow"),
    ("/sample", {"seed": -1}, "seed"),
    ("/sample", {"seed": "abc"}, "seed"),
    ("/sample", {"format": "bmp"}, "format"),
    ("/interpolate", {"steps": 1}, "steps"),
    ("/interpolate", {"steps": 65}, "steps"),
    ("/interpolate", {"method": "cubic"}, "method"),
    ("/interpolate", {"model": "gan", "digit": 3}, "digit"),
    ("/interpolate", {"model": "gan", "digit_to": 3}, "digit_to"),
    ("/interpolate", {"format": "webp"}, "format"),
    ("/sample", {"truncation": 0}, "truncation"),
    ("/generate", {"digit": 1, "truncation": 1.5}, "truncation"),
    ("/interpolate", {"truncation": "nan"}, "truncation"),
    # integers written as integers, as the schema says (pydantic alone would take "0.0", " 5", "5_000")
    ("/sample", {"seed": "0.0"}, "seed"),
    ("/sample", {"seed": " 5"}, "seed"),
    ("/sample", {"n": "1_0"}, "n"),
    ("/generate", {"digit": "+3"}, "digit"),
    ("/sample", {"truncation": " 0.5"}, "truncation"),
    ("/sample", {"truncation": "1_0"}, "truncation"),
    ("/sample", [("model", "gan"), ("model", "cgan")], "model"),  # given twice
    ("/interpolate", [("seed", "1"), ("seed", "2")], "seed"),
])
def test_bad_parameters_are_a_422_naming_the_parameter(client, path, params, param):
    response = client.get(path, params=params)
    assert response.status_code == 422 and detail_names(response, param), response.text


@pytest.mark.parametrize("path", ["/sample?model=nope", "/generate?digit=1&model=nope",
                                  "/interpolate?model=nope", "/models/nope"])
def test_unknown_model_is_a_404_listing_the_available_ones(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "nope" in response.json()["detail"] and "cgan" in response.json()["detail"]


# --- metadata, health, metrics, CORS, OpenAPI -----------------------------------------------------------

def test_models_lists_each_model_with_its_provider_and_defaults(client):
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == {"gan", "cgan"}
    assert models["cgan"]["conditional"] and models["cgan"]["num_classes"] == 10
    assert models["cgan"]["default_for"] == ["generate", "interpolate"] and models["gan"]["default_for"] == ["sample"]
    assert models["gan"]["provider"] == CPU and models["gan"]["metrics"] == {"fid": 1.0}
    assert client.get("/models/gan").json()["latent_dim"] == 8


def test_health_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    client.get("/sample", params={"n": 4})
    client.get("/sample", params={"n": 0})
    text = unversioned(client.get("/metrics").text)
    assert 'digitgen_requests_total{endpoint="/sample",status="200"} 1.0' in text
    assert 'digitgen_requests_total{endpoint="/sample",status="422"} 1.0' in text
    assert "digitgen_request_seconds_bucket" in text and 'digitgen_inference_seconds_count{model="gan"}' in text
    assert 'digitgen_inference_batch_size_sum{model="gan"} 4.0' in text


def test_cors_allows_the_configured_origin_and_exposes_the_seed(client):
    response = client.get("/sample", headers={"Origin": "http://frontend.test"})
    assert response.headers["access-control-allow-origin"] == "http://frontend.test"
    assert "X-Seed" in response.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in client.get("/sample", headers={"Origin": "http://evil.test"}).headers


def test_cors_lets_a_browser_post_v2_binary_requests(client):
    preflight = client.options("/v2/models/gan/infer", headers={
        "Origin": "http://frontend.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, inference-header-content-length"})
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "inference-header-content-length" in preflight.headers["access-control-allow-headers"].lower()


def test_openapi_describes_every_query_parameter(client):
    spec = client.get("/openapi.json").json()
    for path in ("/sample", "/generate", "/interpolate"):
        for parameter in spec["paths"][path]["get"]["parameters"]:
            assert parameter.get("description"), f"{path} {parameter['name']} has no description"


# --- startup: readiness, bad files, providers ---------------------------------------------------------

def test_readyz_is_503_until_the_models_are_warmed(models_dir):
    settings = Settings(models_dir=models_dir, intra_op_threads=1)
    app = create_app(settings, warm=False)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/healthz").status_code == 200
        client.portal.call(app.state.reloader.warm_up)
        assert client.get("/readyz").json() == {"ready": True, "generation": 1, "models": {"cgan": True, "gan": True},
                                                "left_out": {}}


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10] + b"0123456789"), "sha256"),
    (lambda p: p.unlink(), "missing"),
])
def test_a_damaged_model_is_left_out_and_the_rest_serve(models_dir, damage, reason, caplog):
    damage(models_dir / "gan.onnx")
    with caplog.at_level(logging.ERROR), \
            TestClient(create_app(Settings(models_dir=models_dir, intra_op_threads=1))) as client:
        _wait_ready(client)
        assert [m["name"] for m in client.get("/models").json()["models"]] == ["cgan"]
        assert reason in client.get("/readyz").json()["left_out"]["gan"]
        assert client.get("/generate", params={"digit": 1}).status_code == 200
        assert client.get("/sample").status_code == 200  # the default falls to a model that loaded
        assert reason in client.get("/sample", params={"model": "gan"}).json()["detail"]
    assert any("gan" in r.message and reason in r.message for r in caplog.records)


def test_a_corrupt_file_with_a_matching_checksum_is_left_out(models_dir):
    path = models_dir / "gan.onnx"
    path.write_bytes(b"not an onnx file")
    manifest = json.loads((models_dir / "manifest.json").read_text())
    from service.manifest import sha256_of
    entry = manifest["models"][[m["name"] for m in manifest["models"]].index("gan")]
    entry["sha256"], entry["version"] = sha256_of(path), sha256_of(path)[:12]
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    models = open_set(Loader.of(Settings(models_dir=models_dir, intra_op_threads=1)))
    assert list(models.models) == ["cgan"] and "ONNX Runtime" in models.failures["gan"]


def test_a_malformed_manifest_stops_startup_naming_the_field(models_dir, capsys, monkeypatch):
    from service.__main__ import main
    manifest = json.loads((models_dir / "manifest.json").read_text())
    del manifest["models"][0]["latent_dim"]
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--models-dir", str(models_dir)]) == 2
    assert "models.0.latent_dim" in capsys.readouterr().err


@pytest.mark.parametrize("setting, available, driver, first", [
    ("auto", [CUDA, CPU], True, CUDA),
    ("auto", [CUDA, CPU], False, CPU),
    ("auto", [CPU], True, CPU),
    ("cuda", [CUDA, CPU], False, CUDA),
    ("cuda", [CPU], True, CPU),
    ("cpu", [CUDA, CPU], True, CPU),
])
def test_provider_choice_prefers_cuda_when_usable(setting, available, driver, first):
    chosen = choose_providers(setting, available, driver)
    name = chosen[0][0] if isinstance(chosen[0], tuple) else chosen[0]
    assert name == first and chosen[-1] == CPU


def test_cuda_fallback_is_logged(caplog):
    with caplog.at_level(logging.WARNING):
        choose_providers("cuda", [CPU], True)
    assert "using the CPU" in caplog.text


def test_the_service_never_imports_torch(models_dir):
    import subprocess
    code = ("import sys; from fastapi.testclient import TestClient; from service.app import create_app; "
            "from service.config import Settings; "
            f"c = TestClient(create_app(Settings(models_dir={str(models_dir)!r}))).__enter__(); "
            "assert c.get('/sample').status_code == 200; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_inference_and_encoding_run_off_the_event_loop(client, monkeypatch):
    import threading

    from service import imaging
    from service.runtime.model import ModelRuntime
    threads = {}

    def spy(name, original):
        def wrapped(*args, **kwargs):
            threads[name] = threading.current_thread().name
            return original(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(ModelRuntime, "run", spy("run", ModelRuntime.run))
    monkeypatch.setattr(imaging, "png_grid", spy("png", imaging.png_grid))
    assert client.get("/sample", params={"n": 8}).status_code == 200
    assert threads["run"] == "batch-gan" and threads["png"].startswith("encode")
    assert client.get("/sample", params={"n": 1}).status_code == 200  # too small to be worth a hop
    assert threads["png"] == "batch-gan"


def test_a_bad_setting_stops_startup_naming_the_variable(models_dir, monkeypatch, capsys):
    from service.__main__ import main
    monkeypatch.setenv("DIGITGEN_PROVIDERS", "gpu")
    assert main(["--models-dir", str(models_dir)]) == 2
    assert "DIGITGEN_PROVIDERS='gpu'" in capsys.readouterr().err


def test_a_bad_flag_value_is_named_as_the_flag(models_dir, capsys):
    from service.__main__ import main
    assert main(["--models-dir", str(models_dir), "--workers", "0"]) == 2
    assert "error: --workers (DIGITGEN_WORKERS)=0: Input should be greater than or equal to 1" in capsys.readouterr().err


@pytest.mark.parametrize("port, message", [("http", "'http' is not a port number"), ("70000", "outside 0-65535")])
def test_a_bad_port_is_a_cli_error_naming_it_not_a_traceback(models_dir, monkeypatch, capsys, port, message):
    from service.__main__ import main
    monkeypatch.setenv("DIGITGEN_PORT", port)
    with pytest.raises(SystemExit) as exit_:
        main(["--models-dir", str(models_dir)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "DIGITGEN_PORT" in err and "Traceback" not in err


def test_main_leaves_the_environment_as_it_found_it(models_dir, monkeypatch):
    """Settings reach the workers as a value: nothing is written into os.environ for them."""
    import os

    from service import __main__ as cli
    seen = {}
    monkeypatch.setattr(cli.workers, "run", lambda factory, options, count, lifecycle: seen.update(
        settings=factory.args[0], environ=dict(os.environ)) or 0)
    before = dict(os.environ)
    assert cli.main(["--models-dir", str(models_dir), "--workers", "2", "--providers", "cpu"]) == 0
    assert seen["settings"].workers == 2 and seen["settings"].models_dir == models_dir
    assert not {k for k in seen["environ"].keys() - before.keys() if k.startswith("DIGITGEN_")}
    assert dict(os.environ) == before  # PROMETHEUS_MULTIPROC_DIR too is gone after the run


def test_json_width_and_height_come_from_the_manifests_image_shape(tmp_path):
    from onnx_fixtures import entry_for, tiny_generator

    from service.manifest import Manifest
    tiny_generator(tmp_path / "small.onnx", 4, side=14)
    manifest = Manifest(models=[entry_for(tmp_path / "small.onnx", "small", 4, 0, side=14)])
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    with TestClient(create_app(Settings(models_dir=tmp_path, intra_op_threads=1))) as client:
        _wait_ready(client)
        body = client.get("/sample", params={"n": 2, "scale": 3, "format": "json"}).json()
        assert (body["width"], body["height"]) == (42, 42)
        first = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        assert first.size == (42, 42)


# --- workers and settings ------------------------------------------------------------------------------

def test_the_plan_shares_the_cpus_out_among_the_workers(monkeypatch):
    from service import plan as planning
    from service.plan import make_plan as plan
    monkeypatch.setattr(planning, "available_cpus", lambda: 8)

    def planned(**settings):
        chosen = plan(Settings(**settings))
        return chosen.workers, chosen.intra_op_threads
    assert planned(providers="cpu") == (8, 1)
    assert planned(providers="cpu", workers=2) == (2, 4)
    assert planned(providers="cpu", workers=16) == (16, 1)
    assert planned(workers=1, intra_op_threads=3) == (1, 3)
    assert Settings(providers="cpu").workers is None  # the settings alone decide nothing
    assert plan(Settings(providers="cpu")).gpu_mem_limit_mb is None  # no arena without CUDA
    monkeypatch.setattr(planning, "cuda_chosen", lambda setting: True)
    assert planned() == (8, 1)  # on CUDA too: the HTTP and encoding work needs every core
    assert plan(Settings()).gpu_mem_limit_mb == 6144  # one inference process holds the GPU sessions
    assert plan(Settings(gpu_sessions="per-worker")).gpu_mem_limit_mb == 768  # the 6 GB shared out among 8
    assert plan(Settings(workers=64, gpu_sessions="per-worker")).gpu_mem_limit_mb == 256  # never below the floor
    assert plan(Settings(gpu_mem_limit_mb=1000)).gpu_mem_limit_mb == 1000


def test_the_cuda_provider_gets_the_arena_cap_and_grows_it_as_asked():
    providers = choose_providers("cuda", [CUDA, CPU], True, gpu_mem_limit_mb=512)
    assert providers[0] == (CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested",
                                   "gpu_mem_limit": str(512 * 2**20)})
    assert providers[-1] == CPU


def test_the_settings_import_nothing_of_onnx_runtime_or_the_service():
    """Settings are read first and by everything; what depends on the device is planned (service/plan.py)."""
    import subprocess

    from service import config
    assert not {m for m in imports_of(config) if m.startswith("service") or m == "onnxruntime"}
    code = "import sys, service.config; assert 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def two_workers(models_dir, tmp_path):
    """`python -m service --workers 2` on a free port, with its metric files in a folder we can read."""
    import os
    import subprocess
    import time
    import urllib.request
    port = free_port()
    shared = tmp_path / "prometheus"
    shared.mkdir()
    (shared / "counter_1.db").write_bytes(b"stale")  # left by an earlier run: must not be counted
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(shared), "DIGITGEN_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--workers", "2",
                               "--models-dir", str(models_dir)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # until both workers listen (one socket each) and answer
            assert server.poll() is None and time.monotonic() < deadline, "the two workers never started"
            try:
                if listening_sockets(port) == 2 and urllib.request.urlopen(url + "/healthz", timeout=1):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        yield url, port, shared
    finally:
        server.terminate()
        server.wait(30)


def listening_sockets(port: int) -> int:
    lines = open("/proc/net/tcp").read().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A")


def test_metrics_add_up_across_workers(two_workers):
    """Two uvicorn workers, each answering some of the requests; one scrape counts them all."""
    import time
    import urllib.request
    url, _, shared = two_workers
    sent = 0
    while sent < 20 or len(workers_with_counts(shared)) < 2:  # until both have answered
        assert sent < 2000, "one worker never answered"
        assert urllib.request.urlopen(f"{url}/sample?model=gan&seed={sent}", timeout=10).status == 200
        sent += 1
    expected = [f'digitgen_requests_total{{endpoint="/sample",status="200"}} {sent}.0',
                f'digitgen_inference_batch_size_sum{{model="gan"}} {sent}.0']
    for _ in range(50):  # a worker counts a request just after sending its response
        text = unversioned(urllib.request.urlopen(url + "/metrics", timeout=10).read().decode())
        if all(line in text for line in expected):
            break
        time.sleep(0.05)
    assert all(line in text for line in expected), text
    processes = re.findall(r'digitgen_process_resident_memory_bytes\{pid="(\d+)"\} (\S+)', text)
    assert len(processes) == 2 and all(float(rss) > 20e6 for _, rss in processes), text  # each worker's own
    assert {pid for pid, _ in processes} == set(re.findall(r'digitgen_process_open_fds\{pid="(\d+)"\}', text))


def test_a_worker_reports_its_own_process_figures(client):
    text = client.get("/metrics").text
    figures = dict(re.findall(r"^digitgen_process_(\w+) (\S+)$", text, re.M))
    assert set(figures) == {"cpu_seconds", "resident_memory_bytes", "open_fds", "threads"}, figures
    assert float(figures["resident_memory_bytes"]) > 20e6 and float(figures["open_fds"]) >= 3
    assert float(figures["cpu_seconds"]) > 0 and float(figures["threads"]) >= 2


@pytest.mark.skipif(sys.platform != "linux", reason="one SO_REUSEPORT socket per worker is Linux only")
def test_workers_share_a_burst_of_persistent_connections(two_workers):
    """32 keep-alive connections opened at once (a proxy's pool): each worker gets a fair share."""
    import http.client
    import time

    from prometheus_client.mmap_dict import MmapedDict
    _, port, shared = two_workers
    connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(32)]
    for c in connections:
        c.connect()
    for _ in range(3):
        for c in connections:
            c.request("GET", "/sample?model=gan")
            response = c.getresponse()
            assert response.status == 200
            response.read()
    for _ in range(50):  # a worker counts a request just after sending its response
        counted = {path.stem: [(key, value) for key, value, *_ in MmapedDict.read_all_values_from_file(str(path))]
                   for path in shared.glob("counter_*.db") if path.stem != "counter_1"}
        served = {stem: sum(value for key, value in values if "digitgen_requests_total" in key and "/sample" in key)
                  for stem, values in counted.items()
                  if not all("digitgen_reloads" in key for key, _ in values)}  # not the supervisor's file
        if sum(served.values()) == 96:
            break
        time.sleep(0.05)
    assert sum(served.values()) == 96 and len(served) == 2, served
    assert min(served.values()) >= 96 * 0.2, f"requests per worker: {served}"


def workers_with_counts(folder):
    return {p.stem.split("_")[-1] for p in folder.glob("counter_*.db")} - {"1"}


@pytest.mark.parametrize("shape", [(1, 1), (28, 28), (28, 56), (224, 224), (5, 300)])
def test_png_encoder_round_trips_through_pillow(shape):
    from service.imaging import png_bytes
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    image = Image.open(io.BytesIO(png_bytes(pixels)))
    image.verify()  # chunk CRCs and structure
    image = Image.open(io.BytesIO(png_bytes(pixels)))
    assert image.mode == "L" and image.size == shape[::-1]
    assert np.array_equal(np.asarray(image), pixels)


def write_cgroup_v1_quota(folder, quota: str, period: str = "100000"):
    folder.mkdir(exist_ok=True)
    (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (folder / "cpu.cfs_period_us").write_text(period + "\n")
    return folder


@pytest.mark.parametrize("text, cpus", [("max 100000", None), ("150000 100000", 2), ("200000 100000", 2),
                                        ("50000 100000", 1), ("garbage", None)])
def test_a_cgroup_v2_cpu_quota_caps_the_cpus(tmp_path, text, cpus):
    """cpu.max decides when it exists, whatever a cgroup v1 folder beside it says."""
    from service.config import _cgroup_cpu_quota
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert _cgroup_cpu_quota(tmp_path / "cpu.max", write_cgroup_v1_quota(tmp_path / "cpu", "300000")) == cpus


@pytest.mark.parametrize("quota, cpus", [("-1", None), ("100000", 1), ("150000", 2), ("50000", 1), ("garbage", None)])
def test_a_cgroup_v1_cpu_quota_caps_the_cpus(tmp_path, quota, cpus):
    """`--cpus` on a cgroup v1 host: cpu.cfs_quota_us over cpu.cfs_period_us, -1 when unlimited."""
    from service.config import _cgroup_cpu_quota
    assert _cgroup_cpu_quota(tmp_path / "cpu.max", write_cgroup_v1_quota(tmp_path / "cpu", quota)) == cpus


def test_no_cgroup_cpu_quota_is_none(tmp_path):
    from service.config import _cgroup_cpu_quota
    assert _cgroup_cpu_quota(tmp_path / "cpu.max", tmp_path / "cpu") is None


def test_validation_errors_keep_fastapis_shape(client):
    detail = client.get("/generate", params={"digit": 12}).json()["detail"]
    assert detail == [{"type": "less_than_equal", "loc": ["query", "digit"],
                       "msg": "Input should be less than or equal to 9", "input": "12", "ctx": {"le": 9}}]


# --- caching ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, params", [
    ("/sample", {"model": "gan", "seed": 5, "n": 4, "version": "pinned"}),
    ("/sample", {"model": "gan", "seed": 5, "n": 4}),
    ("/generate", {"digit": 3, "seed": 5, "format": "json"}),
    ("/interpolate", {"model": "cgan", "seed": 5, "digit": 1, "digit_to": 7, "format": "gif"}),
])
def test_a_seeded_request_is_cacheable_and_revalidates_to_a_304_without_the_model(client, path, params,
                                                                                  monkeypatch):
    served = client.app.state.models.models[params.get("model", "cgan")].entry.version
    if params.get("version") == "pinned":
        params = params | {"version": served}
    first = client.get(path, params=params)
    tag = first.headers["etag"]
    assert first.status_code == 200 and tag.startswith('"') and not tag.startswith('W/')
    assert first.headers["x-model-version"] == served
    pinned = "version" in params  # else the version served may change with a reload: revalidated after a minute
    assert first.headers["cache-control"] == ("public, max-age=31536000, immutable" if pinned else "public, max-age=60")
    assert client.get(path, params=params).headers["etag"] == tag  # a pure function of the request

    from service.runtime.batcher import Batcher
    monkeypatch.setattr(Batcher, "submit", lambda *a, **k: pytest.fail("a 304 must not queue anything"))
    again = client.get(path, params=params, headers={"If-None-Match": f'"other", {tag}'})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
    assert client.get(path, params=params, headers={"If-None-Match": "*"}).status_code == 304


def test_etags_follow_the_normalised_parameters_and_the_model_file(client, models_dir):
    def tag(**params):
        return client.get("/sample", params={"seed": 5, **params}).headers["etag"]
    assert tag() == tag(model="gan") == tag(n=1, scale=1)  # the default model, default values filled in
    assert len({tag(), tag(n=2), tag(seed=6), tag(truncation=0.5), tag(model="cgan")}) == 5
    from service import caching
    other_file = caching.etag("0" * 64, "sample", {"seed": 5})
    assert other_file != caching.etag("1" * 64, "sample", {"seed": 5})


def test_a_request_without_a_seed_is_not_stored(client):
    response = client.get("/sample", params={"model": "gan"})
    assert response.headers["cache-control"] == "no-store" and "etag" not in response.headers
    assert client.get("/sample", params={"model": "gan"}, headers={"If-None-Match": "*"}).status_code == 200


def test_cors_exposes_the_etag(client):
    response = client.get("/sample", params={"seed": 1}, headers={"Origin": "http://frontend.test"})
    assert "ETag" in response.headers["access-control-expose-headers"]


# --- on a GPU machine: small batches where they run faster -------------------------------------------------

def test_the_cpu_takes_the_batch_sizes_up_to_where_it_stops_being_faster():
    from service.runtime.devices import batch_sizes, cpu_up_to
    gpu = {1: 5.0, 2: 5.0, 4: 5.0, 8: 5.0, 16: 5.0, 32: 5.0, 64: 5.0}.get
    cpu = {1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0, 16: 16.0, 32: 32.0, 64: 64.0}.get
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64] and batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert cpu_up_to(cpu, gpu, batch_sizes(64)) == 4
    assert cpu_up_to(lambda n: 9.0, gpu, batch_sizes(64)) == 0  # never faster: all on the GPU
    noisy = {1: 1.0, 2: 9.0, 4: 1.0}.get  # one crossover: a size faster again past it does not count
    assert cpu_up_to(noisy, gpu, [1, 2, 4]) == 1


def test_a_model_with_a_cpu_session_sends_small_batches_to_it(models_dir):
    """The pairing a CUDA model gets, with two CPU sessions standing in (which one is 'faster' is faked)."""
    from service.manifest import load_manifest
    from service.runtime import devices
    from service.runtime.model import ModelRuntime
    from service.runtime.session import open_model_session, zeros
    entry = load_manifest(models_dir).model("gan")
    real = open_model_session(models_dir / entry.file, entry, [CPU], 1)
    used = []

    class Spy:
        def __init__(self, name, provider):
            self.name, self.provider = name, provider

        def run(self, z, y):
            used.append((self.name, len(z)))
            return real.run(z, y)

        def close(self):
            pass
    model = ModelRuntime(entry, models_dir / entry.file, Spy("gpu", "CUDAExecutionProvider"), Spy("cpu", CPU),
                         expects_process=False, deadline_min_s=0.5, deadline_max_s=5)
    fake = {"cpu": 1e-4, "gpu": 1e-3}  # per image: the CPU wins up to 8 images
    original = devices.median_seconds
    try:
        devices.median_seconds = lambda run, make, n, runs=5: (fake["cpu"] * n if run.__self__.name == "cpu"
                                                               else fake["gpu"] * 1.0 + 1e-5 * n)
        model.warm((1, 16))
    finally:
        devices.median_seconds = original
    assert model.placement.cpu_up_to == 8 and model.placement.provider == "CUDAExecutionProvider"
    used.clear()
    model.run(*zeros(entry, 8))
    model.run(*zeros(entry, 9))
    assert used == [("cpu", 8), ("gpu", 9)]


def test_gpu_memory_is_read_from_nvidia_smi_for_this_process(tmp_path):
    from service.runtime.devices import gpu_memory_bytes
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '111, 300\\n4242, 1536\\n4242, 512\\n'\n")
    fake.chmod(0o755)
    assert gpu_memory_bytes(4242, str(fake)) == 2048 * 2**20  # both its contexts
    assert gpu_memory_bytes(9, str(fake)) == 0
    assert gpu_memory_bytes(4242, str(tmp_path / "missing")) is None


def test_models_and_metrics_say_where_each_model_runs(client):
    body = client.get("/models").json()
    assert body["gpu_memory_bytes"] is None  # no model on CUDA here
    assert {m["name"]: (m["provider"], m["cpu_up_to_batch"]) for m in body["models"]} == \
        {"gan": (CPU, 0), "cgan": (CPU, 0)}
    text = client.get("/metrics").text
    assert f'digitgen_model_device{{cpu_up_to="0",model="gan",provider="{CPU}"}} 1.0' in text


# --- the hot routes' dispatch ------------------------------------------------------------------------

def test_the_hot_routes_match_behind_a_root_path(models_dir):
    """Behind a proxy that strips a prefix (uvicorn --root-path /digits), the images and V2 infer still
    take the fast dispatch and answer in their own error shapes."""
    app = create_app(Settings(models_dir=models_dir, intra_op_threads=1))
    with TestClient(app, root_path="/digits") as client:
        _wait_ready(client)
        assert client.get("/digits/sample", params={"seed": 1}).status_code == 200
        assert client.get("/digits/generate", params={"digit": 12}).status_code == 422
        missing = client.post("/digits/v2/models/nobody/infer", json={"inputs": []})
        assert missing.status_code == 404 and "error" in missing.json()


def test_an_unexpected_failure_in_a_hot_route_keeps_its_endpoints_error_shape(models_dir, monkeypatch, caplog):
    from service import openinference
    from service.routes import images
    app = create_app(Settings(models_dir=models_dir, intra_op_threads=1))
    monkeypatch.setattr(openinference, "split_body", lambda *a: 1 / 0)
    monkeypatch.setattr(images, "sample_job", lambda *a: 1 / 0)
    with TestClient(app, raise_server_exceptions=False) as client:
        _wait_ready(client)
        v2 = client.post("/v2/models/gan/infer", json={"inputs": []})
        assert v2.status_code == 500 and v2.json() == {"error": "internal error: ZeroDivisionError"}
        sample = client.get("/sample")
        assert sample.status_code == 500 and sample.json() == {"detail": "internal error: ZeroDivisionError"}
    assert "ZeroDivisionError" in caplog.text  # logged with its traceback for whoever runs the service


@pytest.mark.parametrize("param", ["truncation", "seed", "n"])
def test_a_huge_numeric_parameter_is_a_422_at_once_not_a_frozen_worker(client, param):
    """32,000 digits and a stray letter once took a worker 24 s in a backtracking pattern (quadratic); the
    value is refused by its length before any matching, and the pattern is linear anyway."""
    started = time.monotonic()
    response = client.get("/sample", params={param: "1" * 32_000 + "x"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", param]
    assert time.monotonic() - started < 2
    from service.queries import NUMBER
    started = time.monotonic()
    assert NUMBER.fullmatch("1" * 200_000 + "x") is None and time.monotonic() - started < 1  # linear


def test_a_number_written_as_one_is_still_taken(client):
    for value in ("0.5", "1", "1.", ".5", "5e-1", "1.0E0"):
        assert client.get("/sample", params={"truncation": value}).status_code == 200, value


def test_head_is_answered_like_get_without_a_body(client):
    for path in ("/sample?seed=1", "/generate?digit=3&seed=1", "/healthz", "/readyz", "/models"):
        head, get = client.head(path), client.get(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path


def test_every_response_says_how_it_may_be_cached(client):
    assert client.get("/models").headers["cache-control"] == "no-store"
    assert client.get("/readyz").headers["cache-control"] == "no-store"
    assert client.get("/sample", params={"seed": 1}).headers["cache-control"] == "public, max-age=60"


def test_readyz_names_no_server_path(models_dir):
    (models_dir / "gan.onnx").unlink()
    with TestClient(create_app(Settings(models_dir=models_dir.resolve(), intra_op_threads=1))) as client:
        reason = wait_ready(client).get("/readyz").json()["left_out"]["gan"]
    assert reason == "gan.onnx is missing" and str(models_dir) not in reason


def test_version_flags_name_the_release(capsys):
    from service.__main__ import main
    from training.__main__ import main as training_main
    for run in (main, training_main):
        with pytest.raises(SystemExit) as done:
            run(["--version"])
        assert done.value.code == 0 and capsys.readouterr().out.startswith("digit-gen ")


@pytest.mark.parametrize("value, named", [
    ("http://localhost:3000", "not valid JSON; a list is written as"),  # was a 40-line traceback
    ('["localhost:3000"]', "'localhost:3000' is not an origin"),  # was accepted, and matched no browser
])
def test_a_bad_cors_setting_is_one_error_line_and_exit_2(models_dir, monkeypatch, capsys, value, named):
    from service.__main__ import main
    monkeypatch.setenv("DIGITGEN_CORS_ORIGINS", value)
    assert main(["--models-dir", str(models_dir)]) == 2
    err = capsys.readouterr().err
    assert "DIGITGEN_CORS_ORIGINS" in err and named in err and "Traceback" not in err


def test_the_license_the_package_declares_is_in_the_repository():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    assert 'license = "MIT"' in (root / "pyproject.toml").read_text()
    assert (root / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("word, hint", [("pruen", "did you mean prune?"), ("serve", "to serve, give flags only")])
def test_a_mistyped_command_is_named_with_the_commands_there_are(word, hint, capsys):
    from service.__main__ import main
    assert main([word]) == 2
    err = capsys.readouterr().err
    assert f"unknown command {word!r}" in err and "triton-repository, keygen, prune" in err and hint in err


def test_parameters_an_endpoint_does_not_take_are_named_in_a_header(client):
    """Ignored as FastAPI does (a cache-buster must keep working), but not silently: a typo gets a hint."""
    typo = client.get("/sample", params={"sed": 7, "digit": 3, "_": "123"})
    assert typo.status_code == 200
    assert typo.headers["x-ignored-parameters"] == "sed (did you mean seed?), digit, _"
    assert "x-ignored-parameters" not in client.get("/sample", params={"seed": 7}).headers
    many = client.get("/generate", params={"digit": 1} | {f"p{i}": i for i in range(7)} | {"\u00e9t\u00e9": 1})
    assert many.headers["x-ignored-parameters"] == "p0, p1, p2, p3, p4, and 3 more"
