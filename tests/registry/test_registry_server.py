"""Against a real ``mlflow server`` on 127.0.0.1 (SQLite; PostgreSQL too when BIREFNET_TEST_POSTGRES_URI is set):
register -> alias -> load by alias -> predict, the gate cases, a fresh-process load, two racing registrations,
``mlflow models serve`` over HTTP, and a basic-auth server. Slow lane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from birefnet import registry
from birefnet.registry import CHALLENGER, CHAMPION, TAG_HISTORY
from tests.registry.conftest import make_params, unique_name, workspace, write_params_yaml
from tests.registry.servers import Server, free_port, start_mlflow_server, start_process

pytestmark = pytest.mark.slow


def _client(url: str):  # noqa: ANN202
    import mlflow

    return mlflow.MlflowClient(url, registry_uri=url)


def _champion(url: str, name: str) -> str:
    return str(_client(url).get_model_version_by_alias(name, CHAMPION).version)


def test_register_gate_and_load_by_alias(server_env: Server, tmp_path: Path, tiny_model: Path) -> None:
    """No champion -> first; better -> promoted; worse and equal -> rejected; same weights -> same version.

    The champion also loads by alias in this process and in a fresh one (``mlflow.pyfunc.load_model``)."""
    import mlflow

    name = unique_name()
    params = make_params(name)
    ws = tmp_path / "ws"
    timings = []

    def step(variant: str, sm: float) -> dict:
        workspace(ws, tiny_model, variant, sm)
        start = time.perf_counter()
        record = registry.register(params, base=ws)
        timings.append(time.perf_counter() - start)
        return record

    first = step("v1", 0.70)
    assert first["gate"]["decision"] == "first" and first["aliases"] == [CHALLENGER, CHAMPION]
    assert first["tracking_uri"] == server_env.url

    # a fresh process loads the champion by alias while this one goes on registering
    code = (f"import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/{name}@champion'); "
            "x = np.zeros((2, 33, 47, 3), np.uint8); y = m.predict(x); print('SHAPE', y.shape, y.dtype)")
    fresh = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    image = np.random.default_rng(0).integers(0, 256, (1, 45, 61, 3), dtype=np.uint8)
    mask = model.predict(image)
    assert mask.shape == (1, 45, 61) and mask.dtype == np.uint8

    better = step("v2", 0.75)
    assert better["gate"]["decision"] == "promoted" and better["champion_version"] == better["version"] == "2"
    assert better["gate"]["champion_score"] == pytest.approx(0.70)
    worse = step("v3", 0.60)
    assert worse["gate"]["decision"] == "rejected" and worse["aliases"] == [CHALLENGER]
    equal = step("v4", 0.75)
    assert equal["gate"]["decision"] == "rejected" and "equal to" in equal["gate"]["reason"]
    same = step("v4", 0.75)
    assert not same["created"] and same["version"] == "4"

    client = _client(server_env.url)
    assert _champion(server_env.url, name) == "2"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "4"
    tags = client.get_model_version(name, "3").tags
    assert tags["birefnet.gate.decision"] == "rejected" and tags["birefnet.gate.champion_version"] == "2"
    assert float(tags["birefnet.gate.challenger_score"]) == pytest.approx(0.60)
    assert json.loads(client.get_registered_model(name).tags[TAG_HISTORY]) == ["1", "2"]
    out, err = fresh.communicate(timeout=180)
    assert fresh.returncode == 0, err[-3000:]
    assert "SHAPE (2, 33, 47) uint8" in out
    print(f"[{server_env.backend}] register via server: " + ", ".join(f"{t:.1f}" for t in timings) + " s")


def test_version_links_the_training_run_on_a_server(server_env: Server, tmp_path: Path, tiny_model: Path) -> None:
    """Through the REST API (which checks a version's source against its logged model and tags that model
    itself): the version's run is the training run, its logged model carries the metrics and names it once."""
    import hashlib

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = _client(server_env.url)
    name = unique_name()
    ws = workspace(tmp_path / "ws", tiny_model, "linked", 0.65)
    experiment = client.get_experiment_by_name("birefnet-train-runs")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("birefnet-train-runs")
    train_run = client.create_run(experiment_id, run_name="train-linked").info.run_id
    client.set_terminated(train_run)
    model_sha = hashlib.sha256((ws / "models" / "model.safetensors").read_bytes()).hexdigest()
    (ws / "models" / "train.json").write_text(json.dumps({"mlflow_run_id": train_run, "model_sha256": model_sha}))
    record = registry.register(make_params(name), base=ws)
    version = client.get_model_version(name, record["version"])
    assert version.run_id == train_run and version.tags["birefnet.register_run_id"] == record["run_id"]
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics}["gate.Sm"] == pytest.approx(0.65)
    # the server tags the logged model itself (version as a number); register adds no second entry
    assert json.loads(logged.tags[MLFLOW_MODEL_VERSIONS]) == [{"name": name, "version": int(record["version"])}]


def test_two_registrations_race(server_env: Server, tmp_path: Path, tiny_model: Path, venv_bin: Path) -> None:
    """Two processes register different models at once: the better one ends champion, tags agree with aliases."""
    name = unique_name()
    procs = []
    scores = {"a": 0.60, "b": 0.80}
    for variant, sm in scores.items():
        ws = workspace(tmp_path / variant, tiny_model, variant, sm)
        write_params_yaml(ws / "params.yaml", make_params(name, min_delta=0.001))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([str(venv_bin / "birefnet"), "register", "--params", "params.yaml"], cwd=ws,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    records = {v: json.loads((tmp_path / v / "registry" / "registered.json").read_text()) for v in scores}
    client = _client(server_env.url)
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    assert len(versions) == 2
    champion = _champion(server_env.url, name)
    assert champion == records["b"]["version"]  # the better model, whichever registered first
    assert versions[champion].tags["birefnet.gate.decision"] in ("first", "promoted")
    other = records["a"]["version"]
    # a registered first (became champion, then replaced) or second (rejected against b): both are consistent
    expected = "first" if int(other) < int(champion) else "rejected"
    assert versions[other].tags["birefnet.gate.decision"] == expected
    history = json.loads(client.get_registered_model(name).tags[TAG_HISTORY])
    assert history[-1] == champion
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == max(versions, key=int)
    assert not client.search_registered_models(f"name = '{name}.gate-lock'")


@pytest.fixture(scope="module")
def served_champion(tracking_server: Server, tiny_model: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` of a freshly registered tiny model,
    shared by the HTTP tests of this module (SQLite backend only: serving does not depend on the store)."""
    if tracking_server.backend != "sqlite":
        pytest.skip("serving does not depend on the backend store; run once")
    root = tmp_path_factory.mktemp("serve")
    name = unique_name()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            patch.delenv(key, raising=False)
        registry.register(make_params(name), base=workspace(root / "ws", tiny_model, "serve", 0.5))
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    serve = start_process([mlflow_bin, "models", "serve", "-m", f"models:/{name}@{CHAMPION}", "--env-manager",
                           "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                          f"http://127.0.0.1:{port}", "/ping", root / "serve.log",
                          env={"MLFLOW_TRACKING_URI": tracking_server.url}, cwd=root, timeout_s=90)
    try:
        yield serve
    finally:
        serve.stop()


def _invoke(url: str, body: dict) -> object:
    """POST ``body`` as JSON to ``url/invocations``; return the ``predictions``."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())["predictions"]


def test_models_serve_answers_http(served_champion: Server) -> None:
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` returns a mask for a posted image."""
    image = np.random.default_rng(1).integers(0, 256, (1, 120, 90, 3), dtype=np.uint8)
    latencies = []
    for _ in range(4):
        start = time.perf_counter()
        answer = _invoke(served_champion.url, {"inputs": image.tolist()})
        latencies.append(time.perf_counter() - start)
    mask = np.asarray(answer)
    assert mask.shape == (1, 120, 90) and 0 <= mask.min() and mask.max() <= 255
    print(f"serve startup {served_champion.startup_s:.1f} s; /invocations 120x90 (tiny model): "
          f"{np.median(latencies) * 1000:.0f} ms median of {len(latencies)}")


def _documented_curl_example(port: int) -> str:
    """The shell block of docs/evaluation-and-registry.md after the ``serving-curl-example`` marker, with the
    documented port replaced by ``port``."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "evaluation-and-registry.md").read_text(encoding="utf-8")
    after = text.split("<!-- serving-curl-example", 1)[1]
    block = after.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "127.0.0.1:5001" in block, block
    return block.replace("127.0.0.1:5001", f"127.0.0.1:{port}")


def test_documented_curl_example_posts_base64_png_and_jpeg(served_champion: Server, tmp_path: Path) -> None:
    """The docs' curl example, run as written by bash and the real curl, gets one base64 PNG mask per image at the
    image's size; the PNG's mask equals the raw-pixel answer; an oversized header is refused over HTTP."""
    import base64
    import io
    import shutil

    from PIL import Image

    from tests.data.bomb_images import png_declaring

    for tool in ("curl", "base64", "bash"):
        assert shutil.which(tool), f"{tool} is not installed (the documented example needs it)"
    rng = np.random.default_rng(7)
    png_pixels = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    jpeg_pixels = rng.integers(0, 256, (30, 52, 3), dtype=np.uint8)
    Image.fromarray(png_pixels).save(tmp_path / "photo.png")
    Image.fromarray(jpeg_pixels).save(tmp_path / "photo.jpg", quality=90)
    port = int(served_champion.url.rsplit(":", 1)[1])
    start = time.perf_counter()
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # python3: this venv's
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", _documented_curl_example(port)], cwd=tmp_path,
                          env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:], (tmp_path / "response.json").read_text()
                                  if (tmp_path / "response.json").is_file() else "")
    masks = {}
    for name, pixels in (("photo.png", png_pixels), ("photo.jpg", jpeg_pixels)):
        with Image.open(tmp_path / f"{name}.mask.png") as image:
            assert image.format == "PNG" and image.mode == "L"
            masks[name] = np.asarray(image)
        assert masks[name].shape == pixels.shape[:2] and masks[name].dtype == np.uint8
        assert masks[name].max() > masks[name].min()  # a real prediction, not a constant fill
    as_pixels = np.asarray(_invoke(served_champion.url, {"inputs": png_pixels[None].tolist()}))[0]
    np.testing.assert_array_equal(masks["photo.png"], as_pixels)  # PNG is lossless: same pixels, same mask
    print(f"documented curl example (2 images, tiny model): {seconds * 1000:.0f} ms")

    bomb = base64.b64encode(png_declaring(16384, 16384)).decode("ascii")
    png = io.BytesIO()
    Image.fromarray(png_pixels).save(png, format="PNG")
    with pytest.raises(urllib.error.HTTPError) as refused:
        _invoke(served_champion.url, {"inputs": [base64.b64encode(png.getvalue()).decode("ascii"), bomb]})
    assert refused.value.code == 400
    assert "image 1: image header declares 16384x16384 = 268435456 pixels" in refused.value.read().decode()


def test_basic_auth_server(tmp_path: Path, tiny_model: Path, venv_bin: Path) -> None:
    """Anonymous clients get 401; the pipeline with credentials in the environment registers and promotes."""
    password = "s3cret-Passw0rd-for-tests"
    root = tmp_path / "auth"
    root.mkdir()
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{(root / 'basic_auth.db').resolve()}\n"
                   f"admin_username = admin\nadmin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   # cache credential checks: PBKDF2 on every request is slow on a busy 2-core machine
                   "auth_cache_ttl_seconds = 300\n")
    server = start_mlflow_server(f"sqlite:///{(root / 'mlflow.db').resolve()}", root,
                                 env={"MLFLOW_AUTH_CONFIG_PATH": str(ini),
                                      "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"},
                                 extra=["--app-name", "basic-auth"])
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert info.value.code == 401

        name = unique_name()
        ws = workspace(tmp_path / "ws", tiny_model, "auth", 0.5)
        write_params_yaml(ws / "params.yaml", make_params(name))
        base_env = {k: v for k, v in os.environ.items()
                    if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}
        base_env.update({"MLFLOW_TRACKING_URI": server.url, "OMP_NUM_THREADS": "1"})
        birefnet = str(venv_bin / "birefnet")
        anonymous = subprocess.run([birefnet, "register", "--params", "params.yaml"], cwd=ws, env=base_env,
                                   capture_output=True, text=True, timeout=120)
        assert anonymous.returncode == 3, anonymous.stderr[-2000:]
        assert "MLFLOW_TRACKING_USERNAME" in anonymous.stderr and server.url in anonymous.stderr

        env = {**base_env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        done = subprocess.run([birefnet, "register", "--params", "params.yaml"], cwd=ws, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        workspace(ws, tiny_model, "auth-2", 0.4)
        worse = subprocess.run([birefnet, "register", "--params", "params.yaml"], cwd=ws, env=env,
                               capture_output=True, text=True, timeout=180)
        assert worse.returncode == 0, worse.stderr[-3000:]
        promote = subprocess.run([birefnet, "promote", "--params", "params.yaml", "--version", "2", "--force",
                                  "--reason", "auth test"], cwd=ws, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert promote.returncode == 0, promote.stderr[-3000:]
        assert json.loads(promote.stdout)["to_version"] == "2"
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", password
        try:
            assert _champion(server.url, name) == "2"
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    finally:
        server.stop()
