"""The Open Inference Protocol (KServe V2): in-process over the tiny fixtures, then with tritonclient (a
client nobody here wrote) against `python -m service` on a free port."""

from __future__ import annotations

import base64
import io
import json
import re
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
from conftest import running_service, unversioned
from fastapi.testclient import TestClient
from onnx_fixtures import write_models_dir
from PIL import Image

from service import imaging, sampling
from service.app import create_app
from service.config import Settings

http = pytest.importorskip("tritonclient.http")  # the dev extra
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2") / "exported"
    write_models_dir(folder)  # gan: z [N, 8]; cgan: z [N, 6], y [N, 10]
    return folder


@pytest.fixture(scope="module")
def client(models_dir):
    with TestClient(create_app(Settings(models_dir=models_dir, intra_op_threads=1, max_n=16))) as client:
        for _ in range(400):
            if client.get("/v2/health/ready").status_code == 200:
                break
            time.sleep(0.01)
        yield client


def z_of(n: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)


def infer_json(z: np.ndarray, y: np.ndarray | None = None, **extra) -> dict:
    inputs = [{"name": "z", "shape": list(z.shape), "datatype": "FP32", "data": z.ravel().tolist()}]
    if y is not None:
        inputs.append({"name": "y", "shape": list(y.shape), "datatype": "FP32", "data": y.tolist()})  # nested
    return {"inputs": inputs, **extra}


def test_server_and_model_metadata(client):
    assert client.get("/v2").json() == {"name": "digit-gen", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    version = client.app.state.models.models["cgan"].entry.version
    for path in ("/v2/models/cgan", f"/v2/models/cgan/versions/{version}", "/v2/models/cgan/versions/1"):
        assert client.get(path).json() == {  # "1": what every model answered as before versions
            "name": "cgan", "versions": [version], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "z", "datatype": "FP32", "shape": [-1, 6]},
                       {"name": "y", "datatype": "FP32", "shape": [-1, 10]}],
            "outputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]}
        assert client.get(path + "/ready").status_code == 200
    assert [i["name"] for i in client.get("/v2/models/gan").json()["inputs"]] == ["z"]
    missing = client.get("/v2/models/nope")
    assert missing.status_code == 404 and "model 'nope' not found; available: gan, cgan" in missing.json()["error"]
    assert client.get("/v2/models/cgan/versions/2").status_code == 404
    assert client.get("/v2/models/cgan/versions/2/ready").json()["error"].endswith(f"its versions: {version}")


def test_infer_returns_what_onnx_runtime_returns_on_the_file(client, models_dir):
    z, y = z_of(5, 6), np.eye(10, dtype=np.float32)[[0, 3, 3, 9, 1]]
    y[1] = 0.5 * y[0] + 0.5 * y[4]  # a blend of two classes is a valid y
    reply = client.post("/v2/models/cgan/versions/1/infer", json=infer_json(z, y, id="req-7"))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["model_name"], body["model_version"], body["id"]) == \
        ("cgan", client.app.state.models.models["cgan"].entry.version, "req-7")
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("image", "FP32", [5, 1, 28, 28])
    expected = ort.InferenceSession(str(models_dir / "cgan.onnx")).run(["image"], {"z": z, "y": y})[0]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(5, 1, 28, 28), expected, atol=1e-5)


def test_binary_tensor_data_in_and_out(client, models_dir):
    z = z_of(3, 8, seed=4)
    header = json.dumps({"inputs": [{"name": "z", "shape": [3, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": z.nbytes}}],
                         "outputs": [{"name": "image", "parameters": {"binary_data": True}}]}).encode()
    reply = client.post("/v2/models/gan/infer", content=header + z.tobytes(),
                        headers={"Inference-Header-Content-Length": str(len(header))})
    assert reply.status_code == 200, reply.text
    cut = int(reply.headers["inference-header-content-length"])
    meta = json.loads(reply.content[:cut])
    (out,) = meta["outputs"]
    assert out["parameters"]["binary_data_size"] == 3 * 784 * 4 == len(reply.content) - cut
    images = np.frombuffer(reply.content[cut:], "<f4").reshape(out["shape"])
    expected = ort.InferenceSession(str(models_dir / "gan.onnx")).run(["image"], {"z": z})[0]
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_generate_draws_exactly_the_images_v2_returns_for_the_seeds_z(client):
    """/generate?seed=S is the model at sampling.latents(S): its uint8 pixels are V2's output, rounded."""
    seed, n, digit = 1234, 3, 7
    shown = client.get("/generate", params={"model": "cgan", "seed": seed, "n": n, "digit": digit,
                                            "format": "json"}).json()["images"]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in shown])
    z, y = sampling.latents(seed, n, 6), sampling.one_hot([digit] * n, 10)
    out = client.post("/v2/models/cgan/infer", json=infer_json(z, y)).json()["outputs"][0]
    assert np.array_equal(pixels, imaging.to_uint8(np.array(out["data"], np.float32).reshape(n, 1, 28, 28)))


Z8 = {"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}


def cgan_body(y_row, z_rows: int = 1) -> dict:
    return {"inputs": [{"name": "z", "shape": [z_rows, 6], "datatype": "FP32", "data": [0.1] * 6 * z_rows},
                       {"name": "y", "shape": [1, 10], "datatype": "FP32", "data": y_row}]}


@pytest.mark.parametrize("model, body, message", [
    ("gan", {"inputs": [Z8 | {"datatype": "FP64"}]}, "input 'z': datatype 'FP64'; this model takes FP32"),
    ("gan", {"inputs": [Z8 | {"datatype": "INT32", "data": [0] * 8}]}, "datatype 'INT32'"),
    ("gan", {"inputs": [Z8 | {"shape": [1, 7], "data": [0.0] * 7}]}, "shape [1, 7]; expected [batch >= 1, 8]"),
    ("gan", {"inputs": [Z8 | {"shape": [8]}]}, "shape [8]; expected [batch, 8]"),
    ("gan", {"inputs": [Z8 | {"shape": [0, 8], "data": []}]}, "expected [batch >= 1, 8]"),
    ("gan", {"inputs": [Z8 | {"data": [0.0] * 7}]}, "7 values for shape [1, 8] (8)"),
    ("gan", {"inputs": [Z8 | {"data": ["0"] * 8}]}, "`data` must hold numbers only"),
    ("gan", {"inputs": [Z8 | {"data": [True] * 8}]}, "`data` must hold numbers only"),
    ("gan", {"inputs": [Z8 | {"data": [float("nan")] + [0.0] * 7}]}, "values must be finite"),
    ("gan", {"inputs": [Z8 | {"data": [1e39] + [0.0] * 7}]}, "values must be finite"),
    ("gan", {"inputs": [Z8 | {"shape": [17, 8], "data": [0.0] * 136}]}, "batch 17 is more than this service's "
                                                                          "largest, 16 (DIGITGEN_MAX_N)"),
    ("gan", {"inputs": [Z8, Z8]}, "input 'z' is given twice"),
    ("gan", {"inputs": [Z8 | {"name": "x"}]}, "input 'x': this model takes z"),
    ("gan", {"inputs": [Z8 | {"name": "y"}]}, "input 'y': this model takes z"),
    ("gan", {"inputs": []}, "`inputs` must be a non-empty list"),
    ("gan", {"inputs": [Z8], "outputs": [{"name": "logits"}]}, "output 'logits': the model's only output is 'image'"),
    ("gan", {"inputs": [Z8], "id": 5}, "`id` must be a string"),
    ("gan", {"inputs": [Z8 | {"data": None}]}, "`data` must be a list"),
    ("gan", {"inputs": [{k: v for k, v in Z8.items() if k != "data"}]}, "no `data` and no binary_data_size"),
    ("gan", [1, 2], "the request must be a JSON object"),
    ("cgan", {"inputs": [{"name": "z", "shape": [1, 6], "datatype": "FP32", "data": [0.1] * 6}]},
     "input 'y' is missing: model 'cgan' takes z and y"),
    ("cgan", cgan_body([0.6] * 2 + [0.0] * 8), "input 'y': row 0 sums to 1.2; each row must sum to 1"),
    ("cgan", cgan_body([2.0, -1.0] + [0.0] * 8), "input 'y': values must lie in [0, 1]"),
    ("cgan", cgan_body([1.0] + [0.0] * 9, z_rows=2), "input 'y': batch 1 differs from z's 2"),
])
def test_bad_input_is_a_400_naming_the_input(client, model, body, message):
    reply = client.post(f"/v2/models/{model}/infer", content=json.dumps(body))
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]


def test_a_blend_of_two_classes_and_integer_data_are_accepted(client):
    assert client.post("/v2/models/cgan/infer", json=cgan_body([0.5, 0.5] + [0] * 8)).status_code == 200


BINARY_Z = json.dumps({"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 32}}]}).encode()
HEADER = {"Inference-Header-Content-Length": str(len(BINARY_Z))}


def test_a_well_formed_binary_request_is_served(client):
    assert client.post("/v2/models/gan/infer", content=BINARY_Z + bytes(32), headers=HEADER).status_code == 200


@pytest.mark.parametrize("body, headers, message", [
    (b"{not json", {}, "the request is not JSON"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "x"}, "'x' is not an integer"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, "99 is outside the body's 14 bytes"),
    (BINARY_Z.replace(b"size\": 32", b"size\": 31") + bytes(31), HEADER, "binary_data_size 31; shape [1, 8] of FP32 is 32 bytes"),
    (BINARY_Z + bytes(16), HEADER, "binary_data_size 32 but only 16 bytes are left"),
    (BINARY_Z + bytes(40), HEADER, "8 bytes of binary data after the last input's"),
])
def test_bad_binary_requests_are_400s(client, body, headers, message):
    reply = client.post("/v2/models/gan/infer", content=body, headers=headers)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]


def test_v2_requests_are_counted_under_their_own_endpoint(client):
    def served() -> float:
        found = re.search(r'digitgen_requests_total\{endpoint="/v2/models/\{name\}/infer",status="200"\} (\S+)',
                          client.get("/metrics").text)
        return float(found.group(1)) if found else 0.0
    before = served()
    assert client.post("/v2/models/gan/infer", json={"inputs": [Z8]}).status_code == 200
    assert client.post("/v2/models/gan/infer", json={"inputs": [Z8]}).status_code == 200
    assert served() - before == 2


# --- hostile bodies: every one a 4xx {"error"}, none parsed beyond what it takes to refuse it ---------------

def nested(depth: int) -> str:
    return "[" * depth + "0.5" + "]" * depth


@pytest.mark.parametrize("depth, message", [(5000, "nests too deeply"),  # deeper than the JSON parser goes
                                            (900, "nests deeper than its shape's two dimensions"),
                                            (3, "nests deeper than its shape's two dimensions")])
def test_deeply_nested_data_is_a_400_not_a_500(client, depth, message):
    body = '{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": ' + nested(depth) + "}]}"
    reply = client.post("/v2/models/gan/infer", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text


def test_a_batch_over_the_limit_is_refused_by_its_shape_before_its_data_is_read(client, monkeypatch):
    from service import openinference
    monkeypatch.setattr(openinference, "_flatten", lambda *a: pytest.fail("the data was converted"))
    reply = client.post("/v2/models/gan/infer", json={"inputs": [Z8 | {"shape": [10**9, 8], "data": [0.0]}]})
    assert reply.status_code == 400 and "batch 1000000000 is more than" in reply.json()["error"]


def test_the_default_body_limit_fits_max_n_images_of_the_widest_model_as_json(client):
    limit = client.app.state.models.max_body_bytes  # max_n 16; cgan's z 6 + y 10 is the widest
    pretty = json.dumps(infer_json(z_of(16, 6), np.eye(10, dtype=np.float32)[[1] * 16]), indent=4)
    assert len(pretty) < limit < 2 * 1024 * 1024
    assert client.post("/v2/models/cgan/infer", content=pretty).status_code == 200


def test_a_body_over_the_limit_is_a_413_by_its_length_before_it_is_read(client):
    limit = client.app.state.models.max_body_bytes
    reply = client.post("/v2/models/gan/infer", content=b" " * (limit + 1))
    assert reply.status_code == 413 and "DIGITGEN_MAX_BODY_BYTES" in reply.json()["error"]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(client):
    limit, sent = client.app.state.models.max_body_bytes, [0]

    def chunks():  # no Content-Length: the body arrives chunked
        while sent[0] < 10 * limit:
            sent[0] += 65536
            yield b" " * 65536
    reply = client.post("/v2/models/gan/infer", content=chunks())
    assert reply.status_code == 413 and "DIGITGEN_MAX_BODY_BYTES" in reply.json()["error"]


def test_the_body_limit_is_a_setting(models_dir):
    with TestClient(create_app(Settings(models_dir=models_dir, intra_op_threads=1, max_body_bytes=2048),
                               warm=False)) as small:
        body = json.dumps({"inputs": [Z8 | {"data": [0.123456789] * 8}], "id": "x" * 2048})
        assert small.post("/v2/models/gan/infer", content=body).status_code == 413


# --- tritonclient against a real server ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(models_dir):
    """`python -m service` on a free port, as `make serve` runs it."""
    with running_service(models_dir) as service:
        yield service.url.removeprefix("http://")


@pytest.fixture(scope="module")
def batching_server(models_dir):
    """A server whose batches wait up to a second for company, and go as soon as 32 images are queued."""
    with running_service(models_dir, batch_max_wait_ms="1000", batch_max_size="32") as service:
        yield service.url.removeprefix("http://")


def test_tritonclient_health_metadata_and_infer_in_both_modes(server, models_dir):
    client = http.InferenceServerClient(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cgan")
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert client.get_model_metadata("cgan", "1")["inputs"][1] == {"name": "y", "datatype": "FP32",
                                                                    "shape": [-1, 10]}
    z, y = z_of(4, 6, seed=9), np.eye(10, dtype=np.float32)[[2, 5, 2, 5]]
    expected = ort.InferenceSession(str(models_dir / "cgan.onnx")).run(["image"], {"z": z, "y": y})[0]
    for binary in (False, True):
        inputs = [http.InferInput("z", z.shape, "FP32"), http.InferInput("y", y.shape, "FP32")]
        inputs[0].set_data_from_numpy(z, binary_data=binary)
        inputs[1].set_data_from_numpy(y, binary_data=binary)
        result = client.infer("cgan", inputs, request_id=f"id-{binary}",
                              outputs=[http.InferRequestedOutput("image", binary_data=binary)])
        assert result.get_response()["id"] == f"id-{binary}"
        np.testing.assert_allclose(result.as_numpy("image"), expected, atol=1e-5)
    default = client.infer("cgan", inputs)  # no outputs named: tritonclient asks for binary data
    np.testing.assert_allclose(default.as_numpy("image"), expected, atol=1e-5)


def test_tritonclient_sees_our_400s(server):
    client = http.InferenceServerClient(server)
    wrong = http.InferInput("z", [1, 5], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("gan", [wrong])
    assert err.value.status() == "400"
    assert err.value.message() == "input 'z': shape [1, 5]; expected [batch >= 1, 8]"
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "404"


def test_32_concurrent_async_infers_are_batched(batching_server):
    server = batching_server
    def histogram() -> tuple[float, float]:
        text = unversioned(urllib.request.urlopen(f"http://{server}/metrics").read().decode())
        calls = re.search(r'digitgen_inference_batch_size_count\{model="gan"\} (\S+)', text)
        images = re.search(r'digitgen_inference_batch_size_sum\{model="gan"\} (\S+)', text)
        return (float(calls.group(1)), float(images.group(1))) if calls else (0.0, 0.0)

    client = http.InferenceServerClient(server, concurrency=32)
    calls_before, images_before = histogram()
    zs = [z_of(1, 8, seed=s) for s in range(32)]
    pending = []
    for z in zs:
        tensor = http.InferInput("z", [1, 8], "FP32")
        tensor.set_data_from_numpy(z, binary_data=True)
        pending.append(client.async_infer("gan", [tensor]))
    results = [request.get_result().as_numpy("image") for request in pending]
    assert all(out.shape == (1, 1, 28, 28) for out in results)
    calls, images = histogram()
    assert images - images_before == 32
    assert calls - calls_before < 32, "every request ran alone: nothing was batched"
    client.close()


@pytest.mark.parametrize("raw, message", [
    ('{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [' + "9" * 5000 + ', 0, 0, 0, 0, 0, 0, 0]}]}',
     "does not take"),  # past the JSON parser's digit limit (was a 500)
    ('{"inputs": [{"name": "z", "shape": [' + "9" * 5000 + ', 8], "datatype": "FP32", "data": []}]}', "does not take"),
    ('{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [' + str(10 ** 400) + ', 0, 0, 0, 0, 0, 0, 0]}]}',
     "must be finite"),  # beyond float64 (was an OverflowError, a 500)
    ('{"inputs": [{"name": "z", "shape": [1, 8], "datatype": "FP32", "data": [3.4e38, 0, 0, 0, 0, 0, 0, 0]}]}',
     "must lie within"),  # finite, yet far past any latent: the network gave NaN (a JSON 500)
])
def test_absurd_numbers_are_a_400_naming_the_input(client, raw, message):
    reply = client.post("/v2/models/gan/infer", content=raw)
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["error"]


def test_binary_latents_past_the_bound_are_refused_and_outputs_stay_in_0_1(client):
    extreme = np.full(8, 3.4e38, np.float32).tobytes()
    assert client.post("/v2/models/gan/infer", content=BINARY_Z + extreme, headers=HEADER).status_code == 400
    edge = client.post("/v2/models/gan/infer", json=infer_json(np.full((2, 8), -1e4, np.float32)))
    values = np.array(edge.json()["outputs"][0]["data"], np.float32)
    assert edge.status_code == 200 and np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1


def test_routing_errors_under_v2_have_the_protocols_error_shape(client):
    """No such route (404) and a route without that method (405) answer {"error": ...} under /v2, which
    tritonclient parses; elsewhere FastAPI's {"detail": ...} stays."""
    missing = client.get("/v2/no/such/route")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong = client.delete("/v2/models/gan/infer")
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"} and "allow" in wrong.headers
    assert client.get("/no/such/route").json() == {"detail": "Not Found"}
