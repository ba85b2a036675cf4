"""``birefnet ablate``: the paper's ablation rows, their overrides, the baseline's vanilla residual decoder, and
(slow) the rows run as DVC experiments in a temporary clone."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from pydantic import ValidationError

from birefnet import ablate
from birefnet.config import ModelParams, ParamsError, load_params
from birefnet.models.birefnet import BiRefNet
from birefnet.models.blocks import BasicDecoderBlock, VanillaResidualBlock, make_decoder_block
from birefnet.models.deform import DeformableConv2d
from tests.helpers.tinyrepo import make_clone, tiny_params


def test_table1_rows_start_from_the_vanilla_residual_baseline(repo_root: Path, tmp_path: Path) -> None:
    planned = ablate.plan_rows(1, repo_root / "params.yaml", [], tmp_path, "s")
    assert [p.row.label for p in planned] == [
        "Baseline", "+RM", "+RM +InRef", "+RM +OutRef", "+RM +InRef +OutRef (BiRefNet)"]
    models = {p.row.slug: load_params(repo_root / "params.yaml",
                                      [f"{k}={ablate.yaml_flow(v)}" for k, v in p.overrides.items()]).model
              for p in planned}
    base = models["baseline"]
    assert (base.decoder_block, base.attention, base.inward_reference, base.outward_reference) == (
        "vanilla", "none", False, False)
    for slug in ("rm", "rm-inref", "rm-outref", "rm-inref-outref"):
        assert (models[slug].decoder_block, models[slug].attention) == ("basic", "aspp_deformable")
    assert (models["rm"].inward_reference, models["rm"].outward_reference) == (False, False)
    assert (models["rm-inref"].inward_reference, models["rm-inref"].outward_reference) == (True, False)
    assert (models["rm-outref"].inward_reference, models["rm-outref"].outward_reference) == (False, True)
    assert (models["rm-inref-outref"].inward_reference, models["rm-inref-outref"].outward_reference) == (True, True)
    # everything else comes from the workspace params: the rows differ only in the switches above
    untouched = {k: v for k, v in base.model_dump().items()
                 if k not in ("decoder_block", "attention", "inward_reference", "outward_reference")}
    workspace = load_params(repo_root / "params.yaml").model.model_dump()
    assert untouched == {k: workspace[k] for k in untouched}


def test_every_row_writes_its_own_absolute_mlflow_store_and_checkpoints(repo_root: Path, tmp_path: Path) -> None:
    for table in ablate.TABLES:
        planned = ablate.plan_rows(table, repo_root / "params.yaml", [], tmp_path / f"t{table}", "s")
        uris = [p.overrides["tracking.uri"] for p in planned]
        storages = [p.overrides["train.storage_path"] for p in planned]
        assert len(set(uris)) == len(set(storages)) == len(planned)
        for item, uri, storage in zip(planned, uris, storages, strict=True):
            assert uri == f"sqlite:///{(item.folder / 'mlflow.db').resolve()}"
            assert Path(storage).is_absolute() and Path(storage).parent == item.folder.resolve()
            assert Path(item.overrides["tracking.artifact_location"]).is_absolute()
        assert len({p.experiment for p in planned}) == len(planned)


def test_set_applies_to_every_row_but_cannot_move_the_isolated_paths(repo_root: Path, tmp_path: Path) -> None:
    planned = ablate.plan_rows(1, repo_root / "params.yaml", ["loader.epoch_batches=7"], tmp_path, "s")
    assert all(p.overrides["loader.epoch_batches"] == 7 for p in planned)
    with pytest.raises(ParamsError, match="tracking.uri"):
        ablate.plan_rows(1, repo_root / "params.yaml", ["tracking.uri=sqlite:///mlflow.db"], tmp_path, "s")
    with pytest.raises(ParamsError, match="row 'Baseline'.*attention_strides"):
        ablate.plan_rows(1, repo_root / "params.yaml", ["model.attention_strides=[5]"], tmp_path, "s")


def test_table2_rows_switch_the_training_strategies_at_an_equal_budget(repo_root: Path, tmp_path: Path) -> None:
    planned = {p.row.slug: p for p in ablate.plan_rows(2, repo_root / "params.yaml", [], tmp_path, "s")}
    workspace = load_params(repo_root / "params.yaml").train.stages
    total = sum(s.epochs for s in workspace)
    assert any(s.loss.bce == 0 for s in workspace), "the workspace schedule should end with region fine-tuning"
    bare = planned["no-strategies"].overrides["train.stages"]
    assert all(s["supervise"] == "final" for s in bare)
    assert all(s["loss"]["bce"] > 0 for s in bare) and sum(s["epochs"] for s in bare) == total
    mss = planned["mss"].overrides["train.stages"]
    assert all(s["supervise"] == "all" for s in mss) and all(s["loss"]["bce"] > 0 for s in mss)
    assert sum(s["epochs"] for s in mss) == total
    assert "train.stages" not in planned["mss-rlft"].overrides  # the workspace's own schedule


@pytest.mark.parametrize("value", [
    None, True, 3, 1e-4, "none", "sqlite:////tmp/a b/mlflow.db", "it's", [4, 8], [],
    [{"name": "main", "epochs": 2, "size": [192, 192], "lr": None, "loss": {"bce": 0.0}, "decay": {}}],
])
def test_hydra_value_is_read_back_by_dvcs_override_parser(value: object) -> None:
    parsed = OverridesParser.create().parse_overrides([f"key={ablate.hydra_value(value)}"])[0].value()
    assert parsed == value


def test_dry_run_prints_every_row_and_its_overrides_without_running(repo_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    monkeypatch.chdir(repo_root)
    code = ablate.main(["--table", "1", "--dry-run", "--work", str(tmp_path / "w"), "--set", "loader.epoch_batches=3"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("-S loader.epoch_batches=3") == 5
    assert "-S model.decoder_block='vanilla'" in out and out.count("-S model.attention='aspp_deformable'") == 4
    assert not (tmp_path / "w").exists()


def test_bad_set_exits_2_and_names_the_key(repo_root: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(repo_root)
    assert ablate.main(["--table", "1", "--dry-run", "--set", "loader.batch_size=zero"]) == 2
    assert "loader.batch_size" in capsys.readouterr().err


def test_outside_a_git_repository_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert ablate.main(["--table", "1", "--dry-run"]) == 3
    assert "git repository" in capsys.readouterr().err


def test_markdown_table_has_one_row_per_experiment_and_marks_failures(tmp_path: Path) -> None:
    planned = ablate.plan_rows(1, Path(__file__).resolve().parents[1] / "params.yaml", [], tmp_path, "s")[:3]
    results = [
        ablate.RowResult(planned[0], metrics={"maxF": 0.5, "wF": 0.4, "MAE": 0.1, "Sm": 0.6, "meanE": 0.7, "HCE": 900}),
        ablate.RowResult(planned[1], metrics={"maxF": 0.6, "wF": 0.3, "MAE": 0.2, "Sm": 0.5, "meanE": 0.8, "HCE": 800}),
        ablate.RowResult(planned[2], error="dvc exited 1"),
    ]
    lines = ablate.markdown_table(1, results).strip().splitlines()
    assert lines[0].startswith("| Row | maxF ↑ | wF ↑ | MAE ↓ | Sm ↑ | meanE ↑ | HCE ↓")
    body = lines[2:]
    assert len(body) == 3
    assert body[0].startswith("| Baseline | 0.500 | **0.400** | **0.100** | **0.600** | 0.700 | 900 |")
    assert body[1].startswith("| +RM | **0.600** | 0.300 | 0.200 | 0.500 | **0.800** | **800** |")
    assert body[2].startswith("| +RM +InRef | failed |")


def test_queue_states_reads_dvc_queue_status() -> None:
    text = ("Task     Name                         Created    Status\n"
            "5485e26  t1-baseline-1  08:20 AM   Success\n"
            "9edaafc  t1-rm-1        08:20 AM   Running\n")
    assert ablate.queue_states(text, ["t1-baseline-1", "t1-rm-1", "t1-x-1"]) == {
        "t1-baseline-1": "Success", "t1-rm-1": "Running"}


# ------------------------------------------------------------------------------------ the baseline's decoder block


def test_vanilla_residual_block_is_the_resnet_basic_block() -> None:
    torch.manual_seed(0)
    projecting = VanillaResidualBlock(12, 8).eval()
    x = torch.randn(2, 12, 9, 7)
    y = projecting(x)
    assert y.shape == (2, 8, 9, 7) and bool((y >= 0).all())  # ReLU after the sum
    expected = torch.relu(projecting.bn2(projecting.conv2(torch.relu(projecting.bn1(projecting.conv1(x)))))
                          + projecting.shortcut(x))
    torch.testing.assert_close(y, expected)
    same = VanillaResidualBlock(8, 8).eval()
    assert isinstance(same.shortcut, torch.nn.Identity)
    with torch.no_grad():
        for conv in (same.conv1, same.conv2):
            conv.weight.zero_()
    z = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(same(z), torch.relu(z + same.bn2.bias.view(1, -1, 1, 1)))


def test_vanilla_block_refuses_an_attention() -> None:
    assert isinstance(make_decoder_block("vanilla", 16, 8, attention="none"), VanillaResidualBlock)
    with pytest.raises(ValueError, match="no attention"):
        make_decoder_block("vanilla", 16, 8, attention="aspp_deformable")
    with pytest.raises(ValidationError, match="vanilla"):
        ModelParams(decoder_block="vanilla", attention="aspp_deformable")
    assert ModelParams(decoder_block="vanilla", attention="none").decoder_block == "vanilla"


def test_baseline_model_decodes_with_vanilla_blocks_and_no_reconstruction_block() -> None:
    torch.manual_seed(0)
    model = BiRefNet(encoder="test_convnext", decoder_block="vanilla", attention="none", inward_reference=False,
                     outward_reference=False, deform_impl="sampling")
    assert all(isinstance(block, VanillaResidualBlock) for block in model.decoder.blocks)
    assert not any(isinstance(m, DeformableConv2d) for m in model.modules())
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 1, 64, 64) and len(out.stage_logits) == 3 and not out.gradient_logits
    out.logits.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.decoder.blocks.parameters())
    default = BiRefNet(encoder="test_convnext", deform_impl="sampling")
    assert all(type(block) is BasicDecoderBlock for block in default.decoder.blocks)


# ------------------------------------------------------------------------------------ end to end (slow)


def _experiment_eval(clone: Path, name: str) -> dict[str, float]:
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=clone, check=True,
                          capture_output=True, text=True).stdout.split()
    (ref,) = [r for r in refs if r.endswith("/" + name)]
    lock = subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=clone, check=True, capture_output=True,
                          text=True).stdout
    assert "\n  evaluate:" in lock and "\n  register:" not in lock, "the experiment must stop at evaluate"
    text = subprocess.run(["git", "show", f"{ref}:metrics/eval.json"], cwd=clone, check=True, capture_output=True,
                          text=True).stdout
    return json.loads(text)["mean"]


@pytest.mark.slow
def test_ablate_runs_each_row_as_an_experiment_and_tabulates_their_eval_json(tmp_path: Path, repo_root: Path,
                                                                             venv_bin: Path) -> None:
    clone = make_clone(repo_root, tmp_path / "clone", tiny_params(repo_root))
    params_before = (clone / "params.yaml").read_bytes()
    env = dict(os.environ, PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    env.pop("MLFLOW_TRACKING_URI", None)
    work = tmp_path / "work"
    out = clone / "docs" / "ablation-test.md"
    proc = subprocess.run(
        [str(venv_bin / "birefnet"), "ablate", "--table", "1", "--rows", "baseline,rm", "--work", str(work),
         "--set", "train.stages=[{name: main, epochs: 1}]", "--out", str(out)],
        cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[1/2] Baseline" in proc.stdout and "[2/2] +RM" in proc.stdout

    rows = [line for line in out.read_text(encoding="utf-8").splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2
    seen = set()
    for line, label in zip(rows, ("Baseline", "+RM"), strict=True):
        cells = [c.strip().strip("*`") for c in line.strip("|").split("|")]
        assert cells[0] == label
        name = cells[-1]
        assert re.fullmatch(rf"t1-{'baseline' if label == 'Baseline' else 'rm'}-\d{{8}}-\d{{6}}", name)
        mean = _experiment_eval(clone, name)
        for (_, key, _), cell in zip(ablate.COLUMNS, cells[1:-1], strict=True):
            if key == "HCE":
                assert cell == "n/a"  # the tiny config turns HCE off
            else:
                assert cell == f"{mean[key]:.3f}"
        seen.add(json.dumps(mean, sort_keys=True))
    assert len(seen) == 2, "two different models should not score identically"

    # the workspace is untouched: params, no MLflow store or checkpoints of its own, no registered model
    assert (clone / "params.yaml").read_bytes() == params_before
    assert subprocess.run(["git", "status", "--porcelain", "--", "params.yaml", "dvc.lock"], cwd=clone,
                          capture_output=True, text=True, check=True).stdout == ""
    for name in ("mlflow.db", "mlartifacts", "checkpoints", "registry/registered.json"):
        assert not (clone / name).exists(), name
    import mlflow

    for slug in ("baseline", "rm"):
        store = work / slug / "mlflow.db"
        assert store.is_file() and any((work / slug / "checkpoints").iterdir())
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}", registry_uri=f"sqlite:///{store}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs, f"the {slug} experiment should log its training run to its own store"
        assert client.search_registered_models() == []
