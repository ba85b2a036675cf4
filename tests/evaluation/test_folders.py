"""``birefnet evaluate --pred-dir``: pairing, layouts, the JSON schema and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from birefnet.evaluation.folders import MissingPredictionError, evaluate_folders, main
from birefnet.evaluation.metrics import METRIC_KEYS, score_set
from tests.evaluation.evaluation_corpus import make_corpus

CORPUS = make_corpus(seed=0)[:6]


def write_set(pred_dir: Path, gt_dir: Path, cases: list, pred_suffixes: tuple[str, ...] = (".png",)) -> None:
    pred_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, pred, gt) in enumerate(cases):
        cv2.imwrite(str(gt_dir / f"{name}.png"), gt)
        cv2.imwrite(str(pred_dir / f"{name}{pred_suffixes[i % len(pred_suffixes)]}"), pred)


def test_single_set_matches_in_memory_scores(tmp_path: Path) -> None:
    write_set(tmp_path / "preds" / "my-set", tmp_path / "gt", CORPUS, (".png", ".PNG"))
    report = evaluate_folders(tmp_path / "preds" / "my-set", tmp_path / "gt")
    assert list(report["sets"]) == ["my-set"]
    expected = score_set([(p, g) for _, p, g in sorted(CORPUS, key=lambda c: c[0])]).metrics
    assert report["sets"]["my-set"] == pytest.approx(expected, abs=1e-12)
    assert report["mean"]["sets"] == ["my-set"]


def test_cli_writes_the_schema_for_several_sets(tmp_path: Path) -> None:
    for s, name in enumerate(["DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4", "DIS-VD"]):
        cases = make_corpus(seed=s)[:2]
        write_set(tmp_path / "preds" / name, tmp_path / "DIS5K" / name / "gt", cases)
    out = tmp_path / "out" / "eval.json"
    assert main(["--pred-dir", str(tmp_path / "preds"), "--gt-dir", str(tmp_path / "DIS5K"),
                 "--out", str(out), "-q"]) == 0
    report = json.loads(out.read_text())
    assert set(report["sets"]) == {"DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4", "DIS-VD"}
    for metrics in report["sets"].values():
        assert list(metrics) == ["n", *METRIC_KEYS]
        assert metrics["n"] == 2
    mean = report["mean"]
    assert mean["sets"] == ["DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"]
    assert mean["n"] == 8
    assert mean["Sm"] == pytest.approx(np.mean([report["sets"][f"DIS-TE{i}"]["Sm"] for i in range(1, 5)]))
    assert "curves" not in report


def test_missing_prediction_is_named_with_exit_code_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_set(tmp_path / "preds", tmp_path / "gt", CORPUS)
    (tmp_path / "preds" / f"{CORPUS[2][0]}.png").unlink()
    code = main(["--pred-dir", str(tmp_path / "preds"), "--gt-dir", str(tmp_path / "gt"),
                 "--out", str(tmp_path / "eval.json"), "-q"])
    assert code == 3
    assert f"{CORPUS[2][0]}.png" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


def test_jpeg_predictions_pair_by_stem(tmp_path: Path) -> None:
    write_set(tmp_path / "preds", tmp_path / "gt", CORPUS[:3], (".jpg", ".JPEG"))
    report = evaluate_folders(tmp_path / "preds", tmp_path / "gt", hce=False)
    assert report["sets"]["preds"]["n"] == 3
    assert "HCE" not in report["sets"]["preds"]


def test_results_do_not_depend_on_workers(tmp_path: Path) -> None:
    write_set(tmp_path / "preds", tmp_path / "gt", make_corpus(seed=4))
    one = evaluate_folders(tmp_path / "preds", tmp_path / "gt", workers=1)
    two = evaluate_folders(tmp_path / "preds", tmp_path / "gt", workers=2)
    assert one["sets"] == two["sets"]


# --- pixel guard: headers are checked before cv2 decodes -------------------------------------------------------


def test_real_256m_pixel_png_prediction_is_refused_before_decoding(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A valid 16384x16384 PNG (260 KB) that cv2.imread decodes in full is refused over data.max_image_pixels."""
    from tests.data.bomb_images import black_png

    write_set(tmp_path / "preds", tmp_path / "gt", CORPUS[:2])
    bomb = tmp_path / "preds" / f"{CORPUS[1][0]}.png"
    bomb.write_bytes(black_png(16384, 16384))
    with pytest.raises(MissingPredictionError) as info:
        evaluate_folders(tmp_path / "preds", tmp_path / "gt")
    message = str(info.value)
    assert str(bomb) in message
    assert "16384x16384 = 268435456 pixels, more than data.max_image_pixels = 200000000" in message
    code = main(["--pred-dir", str(tmp_path / "preds"), "--gt-dir", str(tmp_path / "gt"),
                 "--out", str(tmp_path / "eval.json"), "-q"])
    assert code == 3
    assert "16384x16384" in capsys.readouterr().err and not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_declared_size_over_the_params_limit_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        workers: int) -> None:
    """--params sets the limit (data.max_image_pixels); the ground-truth side is checked too, in worker processes."""
    from tests.data.bomb_images import png_declaring

    write_set(tmp_path / "preds", tmp_path / "gt", CORPUS[:2])
    gt_bomb = tmp_path / "gt" / f"{CORPUS[0][0]}.png"
    gt_bomb.write_bytes(png_declaring(3000, 1000))  # 3M pixels declared, no real data
    params = tmp_path / "params.yaml"
    params.write_text((Path(__file__).resolve().parents[2] / "params.yaml").read_text(encoding="utf-8"),
                      encoding="utf-8")
    args = ["--pred-dir", str(tmp_path / "preds"), "--gt-dir", str(tmp_path / "gt"), "--out",
            str(tmp_path / "eval.json"), "-q", "--workers", str(workers), "--params", str(params),
            "--set", "data.max_image_pixels=1000000"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert str(gt_bomb) in err and "3000x1000 = 3000000 pixels, more than data.max_image_pixels = 1000000" in err
    # the same files under the default limit: the guard passes and cv2 reports the missing data by name
    assert main(args[:-4]) == 3
    assert f"cannot read image {gt_bomb}" in capsys.readouterr().err


def test_bad_params_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_set(tmp_path / "preds", tmp_path / "gt", CORPUS[:1])
    code = main(["--pred-dir", str(tmp_path / "preds"), "--gt-dir", str(tmp_path / "gt"), "--out",
                 str(tmp_path / "eval.json"), "-q", "--params", str(tmp_path / "missing.yaml")])
    assert code == 2
    assert "missing.yaml" in capsys.readouterr().err
