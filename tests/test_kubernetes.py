"""deploy/: the Kubernetes overlays and the KServe InferenceServices, checked without a cluster.

Each overlay renders (tests/kustomize.py; against kubectl's kustomize where it is installed); every object
validates against the Kubernetes schemas of the oldest and newest releases it is written for (the
kubernetes-validate package), each InferenceService against KServe's CRD (vendored in tests/schemas); and
what the manifests say about the service is checked against the service itself, run with the manifests'
own settings: the probes' paths and ports, the metric the autoscalers read, the settings, the image's user,
and the command that seeds a models volume. A renamed endpoint, metric or setting fails here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import free_port, running_service
from kustomize import render

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "cpu-models-volume")
KUBERNETES = ("1.30.0", "1.37.0")  # 1.30: the oldest with the preStop sleep action on by default
KSERVE_CRD = ROOT / "tests/schemas/kserve-v0.20.0/serving.kserve.io_inferenceservices.yaml.gz"
KSERVE_CRD_SHA256 = "57c3bf13f77de94678bf2ae3748056ec071ad2b9e88d6a28f44fb4710758fcff"
ADAPTER_VALUES = DEPLOY / "k8s/prometheus-adapter/values.yaml"


def overlay(name: str) -> dict[tuple[str, str], dict]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in render(DEPLOY / "k8s" / name)}


def kserve() -> list[dict]:
    return [obj for path in sorted((DEPLOY / "kserve").glob("*.yaml")) for obj in yaml.safe_load_all(path.read_text())]


def pod_spec(name: str) -> dict:
    return overlay(name)[("Deployment", "digit-gen")]["spec"]["template"]["spec"]


def server(spec: dict) -> dict:
    return next(c for c in spec["containers"] if c["name"] in ("digit-gen", "kserve-container"))


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def dockerfile_env(stage: str) -> dict[str, str]:
    """The ENV of one Dockerfile stage, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    found = {}
    for line in body.splitlines():
        if line.startswith("ENV "):
            found |= dict(re.findall(r"(\w+)=(\S+)", line))
    return found


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_overlay_renders_what_a_deployment_needs(name):
    objects = overlay(name)
    kinds = {kind for kind, _ in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    spec = pod_spec(name)
    image = "digit-gen:cuda" if name == "gpu" else "digit-gen:latest"
    assert [c["image"] for c in spec["containers"] + spec.get("initContainers", [])] == \
        [image] * (len(spec["containers"]) + len(spec.get("initContainers", [])))  # the init container's too


def kubectl_kustomize() -> str | None:
    """kubectl's path when its kustomize is v5 or later (Debian's 1.20 client has v2)."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout
    found = re.search(r"Kustomize Version: v(\d+)", out)
    return kubectl if found and int(found.group(1)) >= 5 else None


@pytest.mark.skipif(kubectl_kustomize() is None, reason="kubectl with kustomize 5 is not installed")
@pytest.mark.parametrize("name", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize(name):
    printed = subprocess.run([kubectl_kustomize(), "kustomize", str(DEPLOY / "k8s" / name)], capture_output=True,
                             text=True, check=True).stdout
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(printed) if o}
    assert overlay(name) == theirs


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_validates_strictly_against_the_kubernetes_schemas(name, version):
    for obj in overlay(name).values():
        kubernetes_validate.validate(obj, version, strict=True)
    for obj in kserve():
        if obj["apiVersion"].startswith("serving.kserve.io/"):
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schemas_refuse_a_misspelt_field():
    deployment = overlay("cpu")[("Deployment", "digit-gen")]
    server(deployment["spec"]["template"]["spec"])["readinessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProb"):
        kubernetes_validate.validate(deployment, KUBERNETES[0], strict=True)


def strict(schema):
    """The CRD's schema refusing unknown fields, as the API server's strict field validation does (a
    structural schema prunes them silently otherwise)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    return [strict(item) for item in schema] if isinstance(schema, list) else schema


def inference_service_schema() -> dict:
    raw = gzip.decompress(KSERVE_CRD.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == KSERVE_CRD_SHA256, "tests/schemas: not the vendored CRD"
    crd = yaml.safe_load(raw)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    return strict(version["schema"]["openAPIV3Schema"])


def test_each_inference_service_validates_against_kserves_crd():
    schema = inference_service_schema()
    services = [obj for obj in kserve() if obj["kind"] == "InferenceService"]
    assert {s["metadata"]["name"] for s in services} == {"digit-gen", "digit-gen-triton"}
    for service in services:
        assert service["apiVersion"] == "serving.kserve.io/v1beta1"
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", service["metadata"]["name"])  # KServe's webhook
        jsonschema.validate(service, schema)
    misspelt = services[0] | {"spec": services[0]["spec"] | {"predicter": {}}}
    with pytest.raises(jsonschema.ValidationError, match="predicter"):
        jsonschema.validate(misspelt, schema)


def test_kserve_runs_our_image_in_standard_mode_with_v2_on_both_ports():
    """KServe's rules a schema cannot hold (its webhook and controller, v0.20.0): two ports need the
    Standard mode; a custom container says its protocol in PROTOCOL; `external` leaves scaling to our HPA,
    which must target the Deployment KServe names <name>-predictor."""
    own = next(o for o in kserve() if o["kind"] == "InferenceService" and o["metadata"]["name"] == "digit-gen")
    annotations = own["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"
    container = own["spec"]["predictor"]["containers"][0]
    assert container["name"] == "kserve-container" and env_of(container)["PROTOCOL"] == "v2"
    assert [p["name"] for p in container["ports"]] == ["http", "grpc"]  # the first is KServe's port 80
    hpa = next(o for o in kserve() if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{own['metadata']['name']}-predictor"
    triton = next(o for o in kserve() if o["metadata"]["name"] == "digit-gen-triton")
    assert triton["spec"]["predictor"]["model"]["runtimeVersion"] == "24.10-py3"  # Triton 2.51, as tested


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def not_load() -> re.Pattern:
    """The endpoints the adapter's rule leaves out of the load (its `endpoint!~` regex, anchored as PromQL's)."""
    return re.compile(re.search(r'endpoint!~"([^"]+)"', adapter_rule()["metricsQuery"]).group(1))


SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}


def test_every_autoscaler_reads_the_metric_the_adapter_serves_from_pods_prometheus_scrapes():
    rule = adapter_rule()
    scaled = {"digit-gen": overlay("cpu")[("Deployment", "digit-gen")]["spec"]["template"]["metadata"]["annotations"]}
    for isvc in (o for o in kserve() if o["kind"] == "InferenceService" and "containers" in o["spec"]["predictor"]):
        scaled[f"{isvc['metadata']['name']}-predictor"] = isvc["spec"]["predictor"]["annotations"]
    autoscalers = [o for o in [*overlay("cpu").values(), *kserve()] if o["kind"] == "HorizontalPodAutoscaler"]
    assert len(autoscalers) == 2
    for hpa in autoscalers:
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
        assert scaled[hpa["spec"]["scaleTargetRef"]["name"]] | SCRAPE == scaled[hpa["spec"]["scaleTargetRef"]["name"]]


def test_the_rule_leaves_out_every_probe_and_the_scrape_and_nothing_else():
    containers = [server(pod_spec(n)) for n in OVERLAYS] + \
                 [o["spec"]["predictor"]["containers"][0] for o in kserve() if o["metadata"]["name"] == "digit-gen"]
    probed = {probe["path"] for c in containers for probe in probes(c).values()}
    grpc_health = {f"/inference.GRPCInferenceService/{name}" for name in ("ServerLive", "ServerReady")}
    for endpoint in probed | grpc_health | {SCRAPE["prometheus.io/path"]}:
        assert not_load().fullmatch(endpoint), endpoint
    for endpoint in ("/generate", "/sample", "/interpolate", "/v2/models/{name}/infer", "/models",
                     "/inference.GRPCInferenceService/ModelInfer"):
        assert not not_load().fullmatch(endpoint), endpoint


@pytest.mark.parametrize("stage, name", [("cpu", "cpu"), ("cuda", "gpu")])
def test_the_pods_run_as_the_images_user_on_its_port(stage, name):
    spec = pod_spec(name)
    user = re.findall(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text().split(f" AS {stage}\n", 1)[1].split(
        "\nFROM ", 1)[0], flags=re.M)
    assert [str(spec["securityContext"]["runAsUser"])] == user
    ports = {p["name"]: p["containerPort"] for p in server(spec)["ports"]}
    assert str(ports["http"]) == dockerfile_env(stage)["DIGITGEN_PORT"]
    assert str(ports["grpc"]) == env_of(server(spec))["DIGITGEN_GRPC_PORT"]
    annotations = overlay(name)[("Deployment", "digit-gen")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["http"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_what_the_service_writes_lies_on_a_writable_volume(name):
    """The root file system is read-only: the temporary folder (the models' checked copies, the workers'
    metric files) and every cache a setting points at must be mounted volumes."""
    spec = pod_spec(name)
    container = server(spec)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert "/tmp" in writable
    for variable in ("XDG_CACHE_HOME", "CUDA_CACHE_PATH"):
        if variable in env_of(container):
            assert any(env_of(container)[variable].startswith(path + "/") for path in writable), variable


def settings_named(name: str) -> bool:
    """Whether the service reads DIGITGEN_<...> `name`: a field of Settings, or a variable its code reads."""
    from service.config import Settings
    fields = {f"DIGITGEN_{field.upper()}" for field in Settings.model_fields}
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    return name in fields or re.search(rf"\b{name}\b", source) is not None


def test_every_digitgen_setting_in_the_manifests_is_one_the_service_reads_and_accepts(monkeypatch):
    from service.config import Settings
    containers = [server(pod_spec(n)) for n in OVERLAYS] + \
                 [o["spec"]["predictor"]["containers"][0] for o in kserve() if o["metadata"]["name"] == "digit-gen"]
    for container in containers:
        for variable, value in env_of(container).items():
            if variable.startswith("DIGITGEN_"):
                assert settings_named(variable), f"{variable}: the service reads no such setting"
                monkeypatch.setenv(variable, value)
        Settings()  # a value out of range raises, naming the variable
        for variable in env_of(container):
            monkeypatch.delenv(variable, raising=False)


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}


def service_env(container: dict, models_dir: Path, grpc_port: int) -> dict[str, str]:
    """The container's DIGITGEN_* settings as `running_service` keywords, on this machine's ports and folder."""
    env = {k.removeprefix("DIGITGEN_").lower(): v for k, v in env_of(container).items() if k.startswith("DIGITGEN_")}
    return env | {"grpc_port": str(grpc_port), "models_dir": str(models_dir)}


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def served_as_deployed():
    """`python -m service` with the CPU overlay's settings (ports and models folder this machine's)."""
    grpc_port = free_port()
    env = service_env(server(pod_spec("cpu")), ROOT / "exported", grpc_port)
    models_dir = env.pop("models_dir")
    with running_service(Path(models_dir), workers=2, **env) as running:
        yield running, grpc_port


def test_the_probes_and_the_scrape_answer_on_the_running_service(served_as_deployed):
    running, grpc_port = served_as_deployed
    own = next(o for o in kserve() if o["metadata"]["name"] == "digit-gen")["spec"]["predictor"]["containers"][0]
    for container in (server(pod_spec("cpu")), server(pod_spec("gpu")), own):
        http = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
        for kind, probe in probes(container).items():
            assert probe["port"] in ("http", http), kind
            assert get(running.url + probe["path"])[0] == 200, f"{kind} {probe['path']}"
    annotations = overlay("cpu")[("Deployment", "digit-gen")]["spec"]["template"]["metadata"]["annotations"]
    status, _ = get(running.url + annotations["prometheus.io/path"])
    assert status == 200
    import tritonclient.grpc as grpcclient
    assert grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_server_ready()


def series(scrape: str, name: str) -> list[float]:
    return [float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines() if re.match(rf"{name}(\{{| )", line)]


def in_flight_under(running, send) -> float:
    """The most digitgen_in_flight_requests read while four clients call send() without pause."""
    import threading
    seen = [0.0]
    stop = threading.Event()

    def load():
        while not stop.is_set():
            send()

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        for _ in range(200):
            seen += series(get(running.url + "/metrics")[1].decode(), "digitgen_in_flight_requests")
            if max(seen) > 0:
                break
    finally:
        stop.set()
        for client in clients:
            client.join()
    return max(seen)


def test_the_adapters_series_are_in_the_scrape_and_requests_count_in_flight(served_as_deployed):
    """The rule's series exist under their names: the latency sum by endpoint (the load's and the probes'),
    one process series per worker. The in-flight gauge, the same quantity read at an instant, is 0 when idle
    (probes and scrapes are not counted) and more under load, over HTTP and over gRPC."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    running, grpc_port = served_as_deployed
    rule = adapter_rule()
    latency = re.search(r"\A(\w+)\{", rule["seriesQuery"]).group(1)
    workers = re.search(r"count\((\w+)\{", rule["metricsQuery"]).group(1)
    get(running.url + "/generate?digit=3")
    scrape = get(running.url + "/metrics")[1].decode()
    assert series(scrape, f'{latency}{{endpoint="/generate"}}') and series(scrape, f'{latency}{{endpoint="/readyz"}}')
    assert len(series(scrape, workers)) == 2  # two workers, two series
    assert series(scrape, "digitgen_in_flight_requests") == [0.0]
    assert in_flight_under(running, lambda: get(running.url + "/sample?n=64&scale=4")) > 0
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    width = json.loads(get(running.url + "/models/gan")[1])["latent_dim"]
    z = grpcclient.InferInput("z", [64, width], "FP32")
    z.set_data_from_numpy(np.zeros((64, width), np.float32))
    assert in_flight_under(running, lambda: client.infer("gan", [z])) > 0


def test_the_init_container_seeds_an_empty_volume_that_the_service_then_serves(tmp_path):
    """The models-volume component's init command, run as written (its paths this machine's), twice: the
    second run leaves the volume alone. The service then serves the copy."""
    (init,) = pod_spec("cpu-models-volume")["initContainers"]
    volume = tmp_path / "models"
    command = [{"/models": str(volume), "/app/exported": str(ROOT / "exported")}.get(a, a) for a in init["command"]]
    assert command[:3] == ["python", "-m", "service"]
    for _ in range(2):
        subprocess.run([sys.executable, *command[1:]], check=True, capture_output=True, cwd=ROOT)
    assert (volume / "manifest.json").read_bytes() == (ROOT / "exported/manifest.json").read_bytes()
    mount = next(m for m in server(pod_spec("cpu-models-volume"))["volumeMounts"] if m["name"] == "models")
    assert env_of(server(pod_spec("cpu-models-volume")))["DIGITGEN_MODELS_DIR"] == mount["mountPath"] == "/models"
    with running_service(volume) as running:
        status, body = get(running.url + "/models")
        assert status == 200 and b'"cgan"' in body
