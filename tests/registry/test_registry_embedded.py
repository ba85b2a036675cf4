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
from birefnet.registry import CHALLENGER, CHAMPION, TAG_EVAL_SETS, TAG_HISTORY, TAG_SHA, RegistryError
from tests.registry.conftest import (
    SELECTION_SET,
    TEST_SETS,
    make_params,
    unique_name,
    workspace,
    write_eval,
    write_params_yaml,
)


def test_pyfunc_masks_at_input_resolution(tiny_model: Path) -> None:
    from birefnet.inference.serving import BiRefNetPyfunc

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
    assert set(json.loads(version.tags[TAG_EVAL_SETS])) == {*TEST_SETS, "DIS-VD"}  # reported and selection sets
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
        tag = json.dumps({s: {"Sm": sm} for s in (*TEST_SETS, SELECTION_SET)})
        v = client.create_model_version(name, f"file:///nonexistent/{i}", tags={TAG_EVAL_SETS: tag})
        out.append(str(v.version))
    return out


def test_promote_and_rollback_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    from birefnet.commands.promote import main as promote_main

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
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = workspace(tmp_path / "ws", tiny_model, "m", sm=0.5)
    write_eval(ws / "metrics" / "eval.json", 0.5, sets=("DIS-TE1",), model=ws / "models" / "model.safetensors")
    with pytest.raises(RegistryError, match="DIS-TE2"):
        registry.register(make_params(unique_name()), base=ws)


def test_gate_selects_on_the_validation_set_not_the_test_sets(tmp_path: Path, tiny_model: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """register.selection_sets (DIS-VD) decides; the reported test sets do not (and stay in the version's tags)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = unique_name()
    params = make_params(name)
    ws = tmp_path / "ws"
    workspace(ws, tiny_model, "first", sm=0.60)
    assert registry.register(params, base=ws)["gate"]["decision"] == "first"
    # much better on the test sets, worse on the validation set: rejected
    workspace(ws, tiny_model, "test-overfit", sm=0.90)
    write_eval(ws / "metrics" / "eval.json", 0.90, model=ws / "models" / "model.safetensors", selection_sm=0.55)
    rejected = registry.register(params, base=ws)
    assert rejected["gate"]["decision"] == "rejected" and rejected["gate"]["sets"] == ["DIS-VD"]
    assert rejected["gate"]["challenger_score"] == pytest.approx(0.55)
    # worse on the test sets, better on the validation set: promoted
    workspace(ws, tiny_model, "val-better", sm=0.50)
    write_eval(ws / "metrics" / "eval.json", 0.50, model=ws / "models" / "model.safetensors", selection_sm=0.70)
    promoted = registry.register(params, base=ws)
    assert promoted["gate"]["decision"] == "promoted" and CHAMPION in promoted["aliases"]
    # with selection_sets empty the gate compares on the test sets: the champion scored 0.50 there, so a model
    # at 0.45 loses however good its validation score
    on_tests = params.model_copy(update={"register": params.register.model_copy(update={"selection_sets": []})})
    workspace(ws, tiny_model, "tests-only", sm=0.45)
    write_eval(ws / "metrics" / "eval.json", 0.45, model=ws / "models" / "model.safetensors", selection_sm=0.99)
    fallback = registry.register(on_tests, base=ws)
    assert fallback["gate"]["decision"] == "rejected" and fallback["gate"]["sets"] == list(TEST_SETS)


def test_metrics_without_the_selection_set_are_an_input_error(tmp_path: Path, tiny_model: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = workspace(tmp_path / "ws", tiny_model, "a", sm=0.5)
    doc = json.loads((ws / "metrics" / "eval.json").read_text())
    del doc["selection"]
    (ws / "metrics" / "eval.json").write_text(json.dumps(doc))
    with pytest.raises(RegistryError, match=r"DIS-VD.*register.selection_sets"):
        registry.register(make_params(unique_name()), base=ws)


def _train_summary(ws: Path, run_id: str) -> None:
    """``models/train.json`` beside the model, naming the training run as the train stage does."""
    import hashlib

    model = ws / "models" / "model.safetensors"
    (ws / "models" / "train.json").write_text(json.dumps({
        "run_name": "train-test", "mlflow_run_id": run_id,
        "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest()}), encoding="utf-8")


def test_version_links_the_training_run_and_carries_the_metrics(tmp_path: Path, tiny_model: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The version's run is the training run of train.json, its logged model holds the evaluation metrics (MLflow 3
    model metrics) and names the version; the register run has the report folder; an unknown training run falls
    back to the register run."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = unique_name()
    params = make_params(name)
    ws = workspace(tmp_path / "ws", tiny_model, "linked", sm=0.70)
    uri = f"sqlite:///{(ws / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    train_run = client.create_run(client.create_experiment("train-runs"), run_name="train-test").info.run_id
    client.set_terminated(train_run)
    _train_summary(ws, train_run)
    report = ws / params.evaluate.reports
    report.mkdir(parents=True)
    (report / "index.md").write_text("# hardest samples\n![](DIS-TE1_0.png)\n", encoding="utf-8")
    (report / "DIS-TE1_0.png").write_bytes(b"\x89PNG\r\n\x1a\n fake figure")

    first = registry.register(params, base=ws)
    version = client.get_model_version(name, first["version"])
    assert version.run_id == train_run  # the registry's run link is the training run, not the register run
    assert version.tags["birefnet.register_run_id"] == first["run_id"] != train_run
    assert version.tags["birefnet.train_run_id"] == train_run
    model_id = version.source.removeprefix("models:/")
    assert model_id.startswith("m-")
    logged = client.get_logged_model(model_id)
    metrics = {m.key: m.value for m in logged.metrics}
    assert metrics["DIS-TE1.Sm"] == pytest.approx(0.70) and metrics["DIS-VD.MAE"] == pytest.approx(0.05)
    assert metrics["gate.Sm"] == pytest.approx(0.70)
    assert set(metrics) == {f"{s}.{m}" for s, values in json.loads(version.tags[TAG_EVAL_SETS]).items()
                            for m in values} | {"gate.Sm"}  # the same numbers as the JSON tag, as metrics
    assert json.loads(logged.tags[MLFLOW_MODEL_VERSIONS]) == [{"name": name, "version": int(first["version"])}]
    # the register run logged each metric once (the model's copy added no second point to its history)
    assert len(client.get_metric_history(first["run_id"], "gate.Sm")) == 1
    artifacts = {f.path for f in client.list_artifacts(first["run_id"], "evaluation/report")}
    assert artifacts == {"evaluation/report/index.md", "evaluation/report/DIS-TE1_0.png"}

    workspace(ws, tiny_model, "unknown-train-run", sm=0.60)
    _train_summary(ws, "0" * 32)  # a run of another tracking server
    second = registry.register(params, base=ws)
    assert client.get_model_version(name, second["version"]).run_id == second["run_id"]
