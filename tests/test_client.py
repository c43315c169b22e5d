"""service/client.py against the app, and service/batch.py (python -m service batch) from the files and from
a running service: the same images, resumable."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from conftest import running_service, wait_ready
from fastapi.testclient import TestClient
from onnx_fixtures import write_models_dir

from service.__main__ import main as service_cli
from service.app import create_app
from service.auth import new_key
from service.client import AsyncClient, Client, ServiceError
from service.config import Settings


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client") / "exported"
    write_models_dir(folder)
    return folder


@pytest.fixture(scope="module")
def app_client(models_dir):
    with TestClient(create_app(Settings(models_dir=models_dir, intra_op_threads=1))) as client:
        wait_ready(client)
        yield client


def test_the_client_returns_images_with_their_seed_model_and_version(app_client):
    with Client("http://test", transport=app_client._transport, retries=0) as client:
        got = client.generate(3, n=4, seed=11)
        assert (len(got.images), got.seed, got.model, got.digits) == (4, 11, "cgan", [3, 3, 3, 3])
        assert got.array().shape == (4, 28, 28) and got.array().dtype == np.uint8
        assert got.version == app_client.app.state.models.models["cgan"].entry.version
        again = client.generate(3, n=4, seed=11)
        assert again.pngs == got.pngs  # seeded: the same bytes
        walk = client.interpolate(steps=5, seed=1, digit=2, digit_to=6)
        assert len(walk.images) == 5 and walk.info["digit_to"] == 6
        assert {m["name"] for m in client.models()} == {"gan", "cgan"} and client.ready()
        with pytest.raises(ServiceError) as err:
            client.generate(12)
        assert err.value.status == 422 and "digit" in err.value.message


def test_the_async_client_does_the_same(app_client):
    async def scenario():
        transport = httpx.ASGITransport(app=app_client.app)
        async with AsyncClient("http://test", transport=transport, retries=0) as client:
            results = await asyncio.gather(*(client.sample(n=2, seed=s, model="gan") for s in range(4)))
            return results, await client.ready()
    results, ready = asyncio.run(scenario())
    assert [r.seed for r in results] == [0, 1, 2, 3] and all(r.model == "gan" and r.digits is None for r in results)
    assert ready


def test_a_503_is_retried_after_its_retry_after_and_a_key_is_sent():
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if len(seen) < 3:
            return httpx.Response(503, json={"detail": "queue full; retry shortly"}, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"model": "gan", "version": "0" * 12, "seed": 5, "truncation": 1.0,
                                         "images": []})
    with Client("http://test", api_key="k3y", transport=httpx.MockTransport(answer), retries=3) as client:
        assert client.sample(seed=5).seed == 5
    assert seen == ["Bearer k3y"] * 3
    seen.clear()
    with Client("http://test", transport=httpx.MockTransport(answer), retries=1) as client:
        with pytest.raises(ServiceError, match="503: queue full"):
            client.sample()


def test_batch_from_the_files_equals_batch_from_the_service_and_resumes(models_dir, tmp_path):
    key, line = new_key("batch")
    (tmp_path / "keys.txt").write_text(line + "\n")
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert service_cli(["batch", str(local), "--n", "150", "--model", "cgan", "--seed", "7",
                        "--models-dir", str(models_dir)]) == 0
    with running_service(models_dir, api_keys_file=str(tmp_path / "keys.txt")) as service:
        assert service_cli(["batch", str(remote), "--n", "150", "--model", "cgan", "--seed", "7", "--url",
                            service.url, "--api-key", key]) == 0
        assert service_cli(["batch", str(tmp_path / "refused"), "--n", "3", "--url", service.url]) == 2
    files = sorted(p.name for p in local.glob('*.png'))
    assert len(files) == 150 and files == sorted(p.name for p in remote.glob('*.png'))
    assert files[0].startswith("000000-") and all((local / f).read_bytes() == (remote / f).read_bytes() for f in files)
    # interrupted: chunk 1 (64-127) was being written, last file first, when it stopped; chunk 2 never began
    for name in files[64:100] + files[128:]:
        (local / name).unlink()
    assert service_cli(["batch", str(local), "--n", "150", "--model", "cgan", "--seed", "7",
                        "--models-dir", str(models_dir)]) == 0
    assert sorted(p.name for p in local.glob('*.png')) == files
    assert (local / files[100]).read_bytes() == (remote / files[100]).read_bytes()


def test_batch_into_an_npz_joins_its_chunks(models_dir, tmp_path):
    out = tmp_path / "digits.npz"
    assert service_cli(["batch", str(out), "--n", "70", "--model", "cgan", "--digit", "4",
                        "--models-dir", str(models_dir)]) == 0
    data = np.load(out)
    assert data["images"].shape == (70, 28, 28) and set(data["digits"].tolist()) == {4}
    assert str(data["model"]) == "cgan" and not (tmp_path / "digits.npz.parts").exists()


@pytest.mark.parametrize("flags, message", [
    (["--model", "nope"], "--model nope: not in"), (["--model", "gan", "--digit", "3"], "gan is not conditional"),
    (["--truncation", "0"], "--truncation 0"), (["--model", "cgan", "--version", "0" * 12], "--version 000000000000"),
])
def test_batch_refuses_bad_flags_by_name(models_dir, tmp_path, capsys, flags, message):
    assert service_cli(["batch", str(tmp_path / "out"), "--n", "3", "--models-dir", str(models_dir), *flags]) == 2
    assert message in capsys.readouterr().err


def readme_block(marker: str, language: str) -> str:
    import re
    from pathlib import Path
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```{language}\n(.*?)```", text, re.S)
    assert block, f"README: the {marker} is missing"
    return block.group(1)


def test_the_readme_client_and_batch_examples_run(models_dir, tmp_path):
    """The quick start's Python example against a running service, and its two batch commands (smaller n)."""
    import os
    import subprocess
    import sys
    program = tmp_path / "client.py"
    program.write_text(readme_block("python client example", "python"))
    commands = [line.split("#")[0].split() for line in readme_block("batch example", "sh").splitlines() if line.strip()]
    with running_service(models_dir) as service:
        done = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env=os.environ | {"DIGITGEN_URL": service.url})
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("7 cgan ") and "(16, 28, 28)" in done.stdout and (tmp_path / "three.png").exists()
        for command in commands:
            assert command[:4] == [".venv/bin/python", "-m", "service", "batch"]
            flags = [service.url if word == "http://127.0.0.1:8000" else "70" if previous == "--n" else word
                     for previous, word in zip(["", *command[4:]], command[4:])]
            if "--url" not in flags:
                flags += ["--models-dir", str(models_dir)]
            assert service_cli(["batch", *[str(tmp_path / flags[0]), *flags[1:]]]) == 0, flags
    assert len(list((tmp_path / "sevens").glob("*-7.png"))) == 70
    assert np.load(tmp_path / "digits.npz")["images"].shape == (70, 28, 28)


def test_a_batch_resumed_with_other_settings_is_refused(models_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert service_cli(["batch", out, "--n", "10", "--model", "cgan", "--models-dir", str(models_dir)]) == 0
    assert service_cli(["batch", out, "--n", "20", "--model", "cgan", "--seed", "3", "--models-dir",
                        str(models_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds a run drawn with other settings" in err and "n 10 (now 20)" in err and "seed 0 (now 3)" in err
