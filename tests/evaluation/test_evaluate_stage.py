"""The ``evaluate`` stage on real tiny shards and an untrained tiny model: JSON schema and values, plots, report."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from birefnet.config import load_params
from birefnet.evaluation.metrics import METRIC_KEYS, score_set

TEST_SETS = ["DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"]
HARD = 2

TINY = {
    "data": {"size": [64, 64], "workers": 1,
             "synthetic": {"counts": {"DIS-TR": 2, "DIS-VD": 1, "DIS-TE1": 3, "DIS-TE2": 2, "DIS-TE3": 2,
                                      "DIS-TE4": 2}, "min_side": 80, "max_side": 144}},
    "model": {"encoder": "test_convnext", "deform_impl": "sampling"},
    "loader": {"batch_size": 2, "workers": 0},
    "evaluate": {"batch_size": 2, "workers": 1, "hard_samples": HARD, "crops": 2},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@contextmanager
def _cwd(folder: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    """Tiny params, real shards from the real stages, and an untrained tiny model at evaluate.model."""
    from birefnet.models import build_model, save_model
    from birefnet.stages import gradients, ingest, shard, synthesize

    ws = tmp_path_factory.mktemp("eval_ws")
    doc = _merge(yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8")), TINY)
    (ws / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    with _cwd(ws):
        for module in (synthesize, ingest, gradients, shard):
            assert module.main(["--params", "params.yaml", "-q"]) == 0, module.__name__
        params = load_params("params.yaml")
        import torch

        torch.manual_seed(0)
        save_model(build_model(params.model), params.model, params.evaluate.model)
    return ws


@pytest.fixture(scope="module")
def evaluated(workspace: Path) -> Path:
    from birefnet.stages.evaluate import main

    with _cwd(workspace):
        assert main(["--params", "params.yaml", "-q"]) == 0
    return workspace


def test_eval_json_schema_and_ranges(evaluated: Path) -> None:
    report = json.loads((evaluated / "metrics" / "eval.json").read_text())
    assert set(report) == {"sets", "mean", "selection", "meta"}
    assert list(report["sets"]) == TEST_SETS
    # the promotion gate's validation set is scored beside the test sets, never mixed into their mean
    assert list(report["selection"]) == ["DIS-VD"]
    counts = TINY["data"]["synthetic"]["counts"]
    for name, metrics in {**report["sets"], **report["selection"]}.items():
        assert list(metrics) == ["n", *METRIC_KEYS]
        assert metrics["n"] == counts[name]
        for key in METRIC_KEYS:
            assert np.isfinite(metrics[key]), (name, key)
            if key != "HCE":
                assert 0.0 <= metrics[key] <= 1.0, (name, key, metrics[key])
        assert metrics["HCE"] >= 0
    assert report["mean"]["sets"] == TEST_SETS
    assert report["mean"]["n"] == sum(counts[s] for s in TEST_SETS)
    assert report["mean"]["Sm"] == pytest.approx(np.mean([report["sets"][s]["Sm"] for s in TEST_SETS]))
    meta = report["meta"]
    assert meta["model"] == "models/model.safetensors" and meta["gt_resolution"] == "original"
    assert meta["input_size"] == [64, 64]


def _predictions(workspace: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(prediction, original GT) per set, computed here from the same model and shards."""
    import birefnet
    from birefnet.data.loader import eval_loader_from_params
    from birefnet.evaluation.runner import predict

    with _cwd(workspace):
        params = load_params("params.yaml")
        model = birefnet.load_model(params.evaluate.model)
        out = {}
        for name in [*TEST_SETS, "DIS-VD"]:
            loader = eval_loader_from_params(params, name, batch_size=params.evaluate.batch_size, normalize=False)
            pairs = []
            for batch, preds in predict(model, loader, device=next(model.parameters()).device, precision="fp32"):
                assert preds.dtype == np.uint8 and preds.shape[1:] == (64, 64)
                # validation shards keep no original masks by default (shard.original_masks: [test])
                masks = batch.get("mask_original", batch["mask"])
                pairs += [(p, np.asarray(m).squeeze()) for p, m in zip(preds, masks, strict=True)]
            out[name] = pairs
    return out


def test_eval_json_equals_score_set_at_original_resolution(evaluated: Path) -> None:
    report = json.loads((evaluated / "metrics" / "eval.json").read_text())
    for name, pairs in _predictions(evaluated).items():
        if name != "DIS-VD":  # test sets are scored at the original size, not the input size
            assert any(gt.shape != (64, 64) for _, gt in pairs)
        expected = score_set(pairs).metrics
        scored = report["selection" if name == "DIS-VD" else "sets"][name]
        assert scored == pytest.approx(expected, rel=1e-12, abs=1e-12), name


def test_results_do_not_depend_on_worker_count(workspace: Path) -> None:
    import birefnet
    from birefnet.data.loader import eval_loader_from_params
    from birefnet.evaluation.runner import evaluate_sets

    with _cwd(workspace):
        params = load_params("params.yaml")
        model = birefnet.load_model(params.evaluate.model)

        def loaders() -> dict:
            return {s: eval_loader_from_params(params, s, batch_size=2, normalize=False) for s in TEST_SETS[:2]}

        one = evaluate_sets(model, loaders(), device=next(model.parameters()).device, workers=1, hard_samples=1)
        two = evaluate_sets(model, loaders(), device=next(model.parameters()).device, workers=2, hard_samples=1)
    for name in one:
        assert one[name].result.metrics == two[name].result.metrics
        assert one[name].images == two[name].images
        assert [h.key for h in one[name].hardest] == [h.key for h in two[name].hardest]


def test_plots_are_valid_csv_and_png(evaluated: Path) -> None:
    plots = evaluated / "metrics" / "plots"
    for kind, columns in (("pr", ["threshold", "recall", "precision"]), ("fmeasure", ["threshold", "fmeasure"]),
                          ("emeasure", ["threshold", "emeasure"])):
        assert sorted(p.stem for p in (plots / kind).glob("*.csv")) == TEST_SETS
        for path in (plots / kind).glob("*.csv"):
            rows = list(csv.DictReader(path.open()))
            assert list(rows[0]) == columns and len(rows) == 256
            values = np.array([[float(r[c]) for c in columns[1:]] for r in rows])
            assert np.all((values >= 0) & (values <= 1))
        image = cv2.imread(str(plots / "png" / f"{kind}.png"))
        assert image is not None and image.shape[0] > 100 and image.std() > 0
    report = json.loads((evaluated / "metrics" / "eval.json").read_text())
    fm = [float(r["fmeasure"]) for r in csv.DictReader((plots / "fmeasure" / "DIS-TE1.csv").open())]
    assert max(fm) == pytest.approx(report["sets"]["DIS-TE1"]["maxF"], abs=1e-6)


def test_report_lists_the_hardest_samples(evaluated: Path) -> None:
    from birefnet.evaluation.report import figure_name

    reports = evaluated / "reports" / "eval"
    index = (reports / "index.md").read_text()
    per_image = list(csv.DictReader((reports / "per_image.csv").open()))
    for name in TEST_SETS:
        figures = sorted((reports / name).glob("*.png"))
        assert len(figures) == HARD
        assert index.count(f"]({name}/") == 2 * HARD  # table link and embedded image
        # the hardest by S-measure, in order
        rows = sorted((r for r in per_image if r["set"] == name), key=lambda r: float(r["Sm"]))
        assert [f.name for f in figures] == [figure_name(i + 1, r["key"]) for i, r in enumerate(rows[:HARD])]
        figure = cv2.imread(str(figures[0]))
        assert figure is not None and figure.shape[0] > 320 and figure.shape[1] > 4 * 64
    assert len(per_image) == sum(TINY["data"]["synthetic"]["counts"][s] for s in TEST_SETS)


def test_detail_windows_find_thin_structure() -> None:
    from birefnet.evaluation.report import detail_windows, error_map

    gt = np.zeros((200, 300), np.uint8)
    cv2.line(gt, (220, 20), (290, 90), 255, 1)  # a wire in the upper right
    gt[120:180, 20:80] = 255  # a blob (little boundary per area)
    pred = gt.copy()
    windows = detail_windows(gt, pred, count=2, fraction=0.25)
    y, x, side = windows[0]
    assert side == 50 and x >= 190 and y <= 90
    assert len(windows) == 2 and abs(windows[1][1] - x) >= side or abs(windows[1][0] - y) >= side
    colours = error_map(np.full((2, 2), 200, np.uint8), np.array([[0, 255], [255, 0]], np.uint8))
    assert colours[0, 0].tolist() == [200, 0, 0] and colours[0, 1].tolist() == [0, 55, 55]


def test_missing_model_is_exit_code_3(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    from birefnet.stages.evaluate import main

    with _cwd(workspace):
        assert main(["--params", "params.yaml", "-q", "--set", "evaluate.model=nope.safetensors"]) == 3
    assert "nope.safetensors" in capsys.readouterr().err


def test_pred_dir_mode_through_the_cli(tmp_path: Path) -> None:
    from birefnet.cli import main

    rng = np.random.default_rng(0)
    (tmp_path / "preds").mkdir()
    (tmp_path / "gt").mkdir()
    pairs = []
    for i in range(3):
        gt = np.zeros((40, 50), np.uint8)
        gt[5 + i:30, 10:35 + i] = 255
        pred = np.clip(gt * 0.8 + rng.normal(0, 20, gt.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "gt" / f"s{i}.png"), gt)
        cv2.imwrite(str(tmp_path / "preds" / f"s{i}.png"), pred)
        pairs.append((pred, gt))
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--pred-dir", str(tmp_path / "preds"), "--gt-dir", str(tmp_path / "gt"),
                 "--out", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    assert report["sets"]["preds"] == pytest.approx(score_set(pairs).metrics, abs=1e-12)
    assert main(["evaluate", "--pred-dir", str(tmp_path / "preds"), "--gt-dir", str(tmp_path / "gt"),
                 "--out", str(out), "-q", "--no-hce"]) == 0
    assert "HCE" not in json.loads(out.read_text())["sets"]["preds"]


@pytest.mark.slow
def test_dvc_reads_the_metrics_and_plots(evaluated: Path, repo_root: Path, venv_bin: Path, tmp_path: Path) -> None:
    """The real dvc.yaml ``evaluate`` stage declarations, read by ``dvc metrics show`` / ``dvc plots show``."""
    repo = tmp_path / "repo"
    shutil.copytree(evaluated / "metrics", repo / "metrics")
    shutil.copytree(evaluated / "reports", repo / "reports")
    shutil.copy(evaluated / "params.yaml", repo / "params.yaml")
    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["evaluate"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stage}}, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("git", "init", "-q")
    run(str(venv_bin / "dvc"), "init", "-q")
    metrics = json.loads(run(str(venv_bin / "dvc"), "metrics", "show", "--json"))
    data = next(iter(metrics.values()))["data"]["metrics/eval.json"]["data"]
    assert data["sets"]["DIS-TE1"]["Sm"] == pytest.approx(
        json.loads((repo / "metrics" / "eval.json").read_text())["sets"]["DIS-TE1"]["Sm"])
    plots = json.loads(run(str(venv_bin / "dvc"), "plots", "show", "--json"))
    names = set(plots["data"])
    for kind in ("pr", "fmeasure", "emeasure"):
        for name in TEST_SETS:
            entry = plots["data"][f"metrics/plots/{kind}/{name}.csv"][0]
            assert entry["type"] == "vega" and len(entry["content"]["data"]["values"]) == 256
    assert {"metrics/plots/png/pr.png", "metrics/plots/png/fmeasure.png", "metrics/plots/png/emeasure.png"} <= names


def test_eval_json_names_the_model_by_sha256(evaluated: Path) -> None:
    import hashlib

    meta = json.loads((evaluated / "metrics" / "eval.json").read_text())["meta"]
    model = evaluated / meta["model"]
    assert meta["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()


def _outputs_agree(ws: Path, model: Path) -> None:
    """eval.json, the curves and the report are one run's, and that run scored ``model``."""
    import hashlib

    report = json.loads((ws / "metrics" / "eval.json").read_text())
    assert report["meta"]["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    with open(ws / "reports" / "eval" / "per_image.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for name, metrics in report["sets"].items():
        sm = [float(r["Sm"]) for r in rows if r["set"] == name]
        assert len(sm) == metrics["n"] and np.mean(sm) == pytest.approx(metrics["Sm"], abs=1e-5), name
        with open(ws / "metrics" / "plots" / "fmeasure" / f"{name}.csv", newline="", encoding="utf-8") as fh:
            curve = [float(r["fmeasure"]) for r in csv.DictReader(fh)]
        assert max(curve) == pytest.approx(metrics["maxF"], abs=1e-5), name
    assert (ws / "metrics" / "plots" / "png" / "pr.png").is_file() and (ws / "reports" / "eval" / "index.md").is_file()


@pytest.mark.slow
def test_evaluate_killed_while_publishing_then_rerun(evaluated: Path, tmp_path: Path) -> None:
    """Kill evaluate after its new report is in place but before its eval.json is: never new beside old."""
    from birefnet.models import build_model, save_model
    from birefnet.publish import CRASH_ENV
    from birefnet.stages.evaluate import main

    ws = tmp_path / "ws"
    shutil.copytree(evaluated, ws)
    _outputs_agree(ws, ws / "models" / "model.safetensors")
    old_eval = (ws / "metrics" / "eval.json").read_bytes()
    with _cwd(ws):
        params = load_params("params.yaml")
        import torch

        torch.manual_seed(1)  # other weights, other scores
        save_model(build_model(params.model), params.model, params.evaluate.model)
    env = {**os.environ, CRASH_ENV: "evaluate:swap1"}
    proc = subprocess.run([sys.executable, "-m", "birefnet.stages.evaluate", "--params", "params.yaml", "-q"],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 137, proc.stderr[-3000:]
    # the new report is in place, the old metrics are not beside it
    assert not (ws / "metrics" / "eval.json").exists()
    assert not (ws / "metrics" / "plots" / "fmeasure").exists()
    with _cwd(ws):
        assert main(["--params", "params.yaml", "-q"]) == 0
    assert (ws / "metrics" / "eval.json").read_bytes() != old_eval
    _outputs_agree(ws, ws / "models" / "model.safetensors")
    assert sorted(p.name for p in (ws / "metrics").iterdir()) == ["eval.json", "plots"]
    assert sorted(p.name for p in (ws / "metrics" / "plots").iterdir()) == ["emeasure", "fmeasure", "png", "pr"]


def test_extra_metrics_reach_eval_json_and_the_per_image_csv(workspace: Path) -> None:
    from birefnet.evaluation.metrics import EXTRA_METRIC_KEYS
    from birefnet.stages.evaluate import main

    with _cwd(workspace):
        assert main(["--params", "params.yaml", "-q", "--set", "evaluate.extra_metrics=[mse, mba, biou]",
                     "--set", "evaluate.out=metrics/eval_extra.json"]) == 0
    report = json.loads((workspace / "metrics" / "eval_extra.json").read_text())
    for name, pairs in _predictions(workspace).items():
        metrics = report["selection" if name == "DIS-VD" else "sets"][name]
        assert list(metrics) == ["n", *METRIC_KEYS, *EXTRA_METRIC_KEYS]
        expected = score_set(pairs, extra=["mse", "mba", "biou"]).metrics
        assert metrics == pytest.approx(expected, rel=1e-12, abs=1e-12), name
    assert all(key in report["mean"] for key in EXTRA_METRIC_KEYS)
    header = (workspace / "reports" / "eval" / "per_image.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.endswith(",MSE,mBA,maxBIoU,meanBIoU"), header
