"""Registry without a server (the embedded default: SQLite + a local artifact folder), the pyfunc model,
``birefnet promote`` and a tracking server that is down. Quick lane."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from birefnet import registry
from birefnet.registry import CHALLENGER, CHAMPION, TAG_EVAL_SETS, TAG_HISTORY, TAG_SHA
from tests.registry.conftest import TEST_SETS, make_params, unique_name, workspace, write_eval, write_params_yaml


def test_pyfunc_masks_at_input_resolution(tiny_model: Path) -> None:
    from birefnet.serving import BiRefNetPyfunc

    model = BiRefNetPyfunc()
    model.load_context(SimpleNamespace(artifacts={"weights": str(tiny_model)},
                                       model_config={"size": [64, 64], "batch_size": 2}))
    rng = np.random.default_rng(0)
    single = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, (3, 40, 30, 3), dtype=np.uint8)
    ragged = [single, batch[0]]
    assert model.predict(None, single).shape == (50, 70)
    out = model.predict(None, batch)
    assert out.shape == (3, 40, 30) and out.dtype == np.uint8
    assert [m.shape for m in model.predict(None, ragged)] == [(50, 70), (40, 30)]
    with pytest.raises(ValueError, match="uint8"):
        model.predict(None, batch.astype(np.float32))


def test_register_embedded_sqlite(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First model -> champion; the same weights again -> no new version; a worse one -> challenger only."""
    import mlflow

    from birefnet.config import ServingParams

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = unique_name()
    params = make_params(name).model_copy(update={"serving": ServingParams(max_image_pixels=1_234_567)})
    ws = workspace(tmp_path / "ws", tiny_model, "a", sm=0.70)
    index = ws / "data" / "shards" / "test" / "index.json"
    index.parent.mkdir(parents=True)
    index.write_text('{"shards": []}', encoding="utf-8")
    (ws / "dvc.lock").write_text("schema: '2.0'\nstages:\n  shard:\n    cmd: birefnet shard\n    outs:\n"
                                 "    - path: data/shards\n      md5: 0123456789abcdef0123456789abcdef.dir\n")

    start = time.perf_counter()
    first = registry.register(params, base=ws)
    seconds = time.perf_counter() - start
    print(f"register (embedded SQLite, new version): {seconds:.1f} s")
    assert first["created"] and first["version"] == "1" and first["gate"]["decision"] == "first"
    assert first["aliases"] == [CHALLENGER, CHAMPION]
    assert json.loads((ws / "registry" / "registered.json").read_text()) == first

    client = mlflow.MlflowClient(first["tracking_uri"], registry_uri=first["tracking_uri"])
    version = client.get_model_version(name, "1")
    assert version.tags[TAG_SHA] == first["content_sha256"]
    assert set(json.loads(version.tags[TAG_EVAL_SETS])) == set(TEST_SETS)
    assert version.tags["birefnet.gate.reason"].startswith("no champion yet")
    assert any(k.startswith("birefnet.audit.") for k in version.tags)
    assert json.loads(client.get_registered_model(name).tags[TAG_HISTORY]) == ["1"]
    config = mlflow.models.get_model_info(f"models:/{name}/1").flavors["python_function"]["config"]
    assert config["max_image_pixels"] == 1_234_567  # serving.max_image_pixels travels with the model
    run = client.get_run(first["run_id"])
    assert run.data.tags["birefnet.stage"] == "register"
    assert run.data.metrics["DIS-TE1.Sm"] == pytest.approx(0.70)
    assert run.data.params["register.model_name"] == name
    assert "birefnet.data.test_index_sha256" in run.data.tags and "birefnet.dvc_lock_sha256" in run.data.tags
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert {"data/shards/test", "dvc:data/shards"} <= names

    again = registry.register(params, base=ws)
    assert not again["created"] and again["version"] == "1" and "unchanged" in again["gate"]["note"]

    workspace(ws, tiny_model, "b", sm=0.60)
    worse = registry.register(params, base=ws)
    assert worse["created"] and worse["version"] == "2" and worse["gate"]["decision"] == "rejected"
    assert worse["aliases"] == [CHALLENGER] and worse["champion_version"] == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def _cheap_versions(client, name: str, sms: list[float]) -> list[str]:  # noqa: ANN001
    """Versions with score tags but no model files (enough for alias logic)."""
    client.create_registered_model(name)
    out = []
    for i, sm in enumerate(sms):
        tag = json.dumps({s: {"Sm": sm} for s in TEST_SETS})
        v = client.create_model_version(name, f"file:///nonexistent/{i}", tags={TAG_EVAL_SETS: tag})
        out.append(str(v.version))
    return out


def test_promote_and_rollback_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    from birefnet.registry import main as promote_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = unique_name()
    params_file = write_params_yaml(tmp_path / "params.yaml", make_params(name))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    v1, v2, v3 = _cheap_versions(client, name, [0.70, 0.80, 0.60])

    def promote(*args: str) -> int:
        return promote_main(["--params", str(params_file), "-q", *args])

    assert promote("--version", v1) == 0  # no champion yet
    assert promote("--version", v3) == 3  # worse: refused
    assert "gate refused" in capsys.readouterr().err
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1
    assert promote("--version", v2, "--reason", "better") == 0
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v2
    assert promote("--rollback", "--reason", "incident 42") == 0
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v1
    assert promote("--rollback") == 3  # nothing earlier than v1
    assert promote("--version", v3, "--force", "--reason", "manual override") == 0
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == v3

    audits = {v: [json.loads(val) for key, val in client.get_model_version(name, v).tags.items()
                  if key.startswith("birefnet.audit.")] for v in (v1, v2, v3)}
    assert [a["action"] for a in audits[v2]] == ["promote", "rollback"]
    rollback = next(a for a in audits[v1] if a["action"] == "rollback")
    assert rollback["from_version"] == v2 and rollback["reason"] == "incident 42" and not rollback["forced"]
    forced = next(a for a in audits[v3] if a["action"] == "promote")
    assert forced["forced"] and forced["checks"] == [] and forced["from_version"] == v1
    assert json.loads(client.get_registered_model(name).tags[TAG_HISTORY]) == [v1, v3]
    # the lock model is gone after every command
    assert not client.search_registered_models(f"name = '{name}.gate-lock'")


def test_tracking_server_down_fails_fast(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A closed port: exit code 3 within seconds, the message names the URI; no hang."""
    from birefnet.stages.register import main
    from tests.registry.servers import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    ws = workspace(tmp_path / "ws", tiny_model, "down", sm=0.5)
    write_params_yaml(ws / "params.yaml", make_params(unique_name()))
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    assert main(["--params", "params.yaml", "-q"]) == 3
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert uri in err and "unreachable" in err and "3 attempts" in err
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert not (ws / "registry").exists()


def test_missing_metrics_set_is_an_input_error(tmp_path: Path, tiny_model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from birefnet.stages.common import StageInputError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = workspace(tmp_path / "ws", tiny_model, "m", sm=0.5)
    write_eval(ws / "metrics" / "eval.json", 0.5, sets=("DIS-TE1",), model=ws / "models" / "model.safetensors")
    with pytest.raises(StageInputError, match="DIS-TE2"):
        registry.register(make_params(unique_name()), base=ws)
