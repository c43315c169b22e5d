"""The Open Inference Protocol over gRPC, driven by tritonclient.grpc (a client nobody here wrote, with its
own copy of the protocol's messages): the same models, answers, errors, queue bound, keys and metrics as
the HTTP V2 routes."""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import free_port, running_service, unversioned, wait_until
from fastapi.testclient import TestClient
from onnx_fixtures import write_models_dir

from service.app import create_app
from service.auth import new_key
from service.config import Settings
from service.manifest import load_manifest

tritongrpc = pytest.importorskip("tritonclient.grpc")  # the dev extra
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpc") / "exported"
    write_models_dir(folder)  # gan: z [N, 8]; cgan: z [N, 6], y [N, 10]
    return folder


@pytest.fixture(scope="module")
def service(models_dir):
    """`python -m service` with gRPC on; (HTTP URL, gRPC address)."""
    port = free_port()
    with running_service(models_dir, workers=2, grpc_port=str(port), max_n="16") as running:
        yield running.url, f"127.0.0.1:{port}"


def infer_inputs(z, y=None):
    inputs = [tritongrpc.InferInput("z", list(z.shape), "FP32")]
    inputs[0].set_data_from_numpy(z)
    if y is not None:
        inputs.append(tritongrpc.InferInput("y", list(y.shape), "FP32"))
        inputs[1].set_data_from_numpy(y)
    return inputs


def test_tritonclient_grpc_health_metadata_and_infer(service, models_dir):
    client = tritongrpc.InferenceServerClient(service[1])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cgan")
    assert list(client.get_server_metadata().extensions) == ["binary_tensor_data"]
    metadata = client.get_model_metadata("cgan", "1", as_json=True)
    assert metadata["inputs"][1] == {"name": "y", "datatype": "FP32", "shape": ["-1", "10"]}
    z = np.random.default_rng(4).standard_normal((3, 6), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[[1, 7, 7]]
    expected = ort.InferenceSession(str(models_dir / "cgan.onnx")).run(["image"], {"z": z, "y": y})[0]
    result = client.infer("cgan", infer_inputs(z, y), request_id="r-1",
                          outputs=[tritongrpc.InferRequestedOutput("image")])
    served = load_manifest(models_dir).model("cgan").version
    assert result.get_response().id == "r-1" and result.get_response().model_version == served
    np.testing.assert_allclose(result.as_numpy("image"), expected, atol=1e-5)
    client.close()


def test_contents_instead_of_raw_bytes_are_served_too(service):
    """A request with typed contents (fp32_contents), built from tritonclient's own message classes."""
    with grpc.insecure_channel(service[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="gan")
        tensor = request.inputs.add(name="z", datatype="FP32", shape=[2, 8])
        tensor.contents.fp32_contents.extend([0.25] * 16)
        reply = stub.ModelInfer(request)
    image = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(reply.outputs[0].shape))
    assert image.shape == (2, 1, 28, 28) and np.array_equal(image[0], image[1])


@pytest.mark.parametrize("tensors, message", [
    ([("z", [1, 5])], "input 'z': shape [1, 5]; expected [batch >= 1, 8]"),
    ([("z", [1, 8]), ("z", [1, 8])], "input 'z' is given twice"),
    ([("w", [1, 8])], "input 'w': this model takes z"),
    ([("z", [17, 8])], "input 'z': batch 17 is more than this service's largest, 16 (DIGITGEN_MAX_N)"),
])
def test_bad_input_is_invalid_argument_with_the_message_of_http_400(service, tensors, message):
    http_url, address = service
    client = tritongrpc.InferenceServerClient(address)
    inputs = []
    for name, shape in tensors:
        tensor = tritongrpc.InferInput(name, shape, "FP32")
        tensor.set_data_from_numpy(np.zeros(shape, np.float32))
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as err:
        client.infer("gan", inputs)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and err.value.message() == message
    body = {"inputs": [{"name": n, "shape": s, "datatype": "FP32", "data": [0.0] * (s[0] * s[1])} for n, s in tensors]}
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(urllib.request.Request(f"{http_url}/v2/models/gan/infer", json.dumps(body).encode()))
    assert http_err.value.code == 400 and json.loads(http_err.value.read())["error"] == message
    client.close()


def test_unknown_models_and_versions_are_not_found(service):
    client = tritongrpc.InferenceServerClient(service[1])
    for call in (lambda: client.get_model_metadata("nope"), lambda: client.get_model_metadata("gan", "2"),
                 lambda: client.is_model_ready("nope")):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "StatusCode.NOT_FOUND"
    client.close()


def test_grpc_requests_are_counted_beside_http(service):
    import re
    import urllib.request
    http_url, address = service

    def served() -> float:
        text = urllib.request.urlopen(f"{http_url}/metrics").read().decode()
        found = re.search(r'digitgen_requests_total\{endpoint="/inference.GRPCInferenceService/ModelInfer",'
                          r'status="OK"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0
    before = served()
    client = tritongrpc.InferenceServerClient(address)
    for _ in range(3):
        client.infer("gan", infer_inputs(np.zeros((1, 8), np.float32)))
    client.close()
    deadline = time.monotonic() + 10
    while served() - before != 3:  # a worker counts a call just after answering it
        assert time.monotonic() < deadline, f"counted {served() - before}, not 3"
        time.sleep(0.05)


# --- in-process: the shared queue bound and the API keys ----------------------------------------------------

def in_process(models_dir, warm=True, **settings):
    port = free_port()
    app = create_app(Settings(models_dir=models_dir, intra_op_threads=1, grpc_port=port, **settings), warm=warm)
    return app, f"127.0.0.1:{port}"


def test_a_full_queue_is_resource_exhausted(models_dir, monkeypatch):
    from service.runtime.model import ModelRuntime
    entered, gate, original = threading.Event(), threading.Event(), ModelRuntime.run

    def held(self, z, y):
        entered.set()
        gate.wait(10)
        return original(self, z, y)
    monkeypatch.setattr(ModelRuntime, "run", held)
    app, address = in_process(models_dir, warm=False, max_queued=2)  # warm-up would run (and block in) `held`
    with TestClient(app) as http, grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="gan")
        request.inputs.add(name="z", datatype="FP32", shape=[1, 8]).contents.fp32_contents.extend([0.0] * 8)
        pending = [stub.ModelInfer.future(request)]
        assert entered.wait(10)  # the first request is in the model, held there
        pending += [stub.ModelInfer.future(request) for _ in range(2)]
        deadline = time.monotonic() + 10
        while 'digitgen_queued_requests{model="gan"} 2.0' not in unversioned(http.get("/metrics").text):
            assert time.monotonic() < deadline, "the two requests never queued"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        gate.set()
        assert all(len(f.result(timeout=10).raw_output_contents) == 1 for f in pending)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queued" in err.value.details()


def test_api_keys_guard_grpc_as_they_guard_http(models_dir, tmp_path):
    key, line = new_key("service-b")
    (tmp_path / "keys.txt").write_text(line + "\n")
    app, address = in_process(models_dir, api_keys_file=tmp_path / "keys.txt")
    with TestClient(app) as http:
        client = tritongrpc.InferenceServerClient(address)
        assert client.is_server_live()  # health stays open, as /v2/health/* does
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as err:
                client.get_model_metadata("gan", headers=headers)
            assert err.value.status() == "StatusCode.UNAUTHENTICATED" and key not in err.value.message()
        for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
            assert client.get_model_metadata("gan", headers=headers).name == "gan"
        assert 'digitgen_key_requests_total{key="service-b"} 2.0' in http.get("/metrics").text
        client.close()


def test_a_taken_grpc_port_is_a_cli_error_naming_it(models_dir, capsys):
    from service.__main__ import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["--models-dir", str(models_dir), "--grpc-port", str(taken.getsockname()[1])]) == 2
    assert "DIGITGEN_GRPC_PORT" in capsys.readouterr().err


def test_the_compiled_descriptor_is_the_proto_file():
    """service/protocol/descriptor.py is inference.proto as protoc compiles it (`make protocol`)."""
    pytest.importorskip("grpc_tools")
    from service.protocol import descriptor, generate
    assert descriptor.DESCRIPTOR == generate.serialized_descriptor()


def test_a_cancelled_call_is_counted_cancelled_and_its_job_never_runs(models_dir, monkeypatch):
    """A client that gives up (its deadline) while its request waits behind a busy model: the call is
    counted CANCELLED, and its job is dropped from the queue, not run for nobody."""
    from service.runtime.model import ModelRuntime
    entered, gate, original, ran = threading.Event(), threading.Event(), ModelRuntime.run, []

    def held(self, z, y):
        ran.append(len(z))
        entered.set()
        gate.wait(10)
        return original(self, z, y)
    monkeypatch.setattr(ModelRuntime, "run", held)
    app, address = in_process(models_dir, warm=False)
    with TestClient(app) as http, grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        first = service_pb2.ModelInferRequest(model_name="gan")
        first.inputs.add(name="z", datatype="FP32", shape=[1, 8]).contents.fp32_contents.extend([0.0] * 8)
        late = service_pb2.ModelInferRequest(model_name="gan")
        late.inputs.add(name="z", datatype="FP32", shape=[3, 8]).contents.fp32_contents.extend([0.0] * 24)
        held_call = stub.ModelInfer.future(first)
        assert entered.wait(10)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(late, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: 'status="CANCELLED"' in http.get("/metrics").text or
                   'status="DEADLINE_EXCEEDED"' in http.get("/metrics").text, "the call was never counted")
        gate.set()
        assert len(held_call.result(timeout=10).raw_output_contents) == 1
        time.sleep(0.3)
        assert ran == [1]  # the late call's 3 rows never ran
        assert 'ModelInfer",status="OK"} 1.0' in http.get("/metrics").text


def test_an_unexpected_failure_is_internal_not_ok(models_dir, monkeypatch):
    from service import grpc_server
    monkeypatch.setattr(grpc_server.wire, "grpc_header", lambda request: 1 / 0)
    app, address = in_process(models_dir)
    with TestClient(app) as http, grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="gan")
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "ZeroDivisionError" in err.value.details()
        assert 'ModelInfer",status="INTERNAL"} 1.0' in http.get("/metrics").text
