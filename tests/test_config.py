from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from birefnet.config import Params, ParamsError, load_params


def write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return p


def test_repository_params_load(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.size[0] % 32 == 0


def test_defaults_are_valid(tmp_path: Path) -> None:
    """The schema's defaults are the paper's DIS5K setting, and an empty params file resolves to them."""
    from birefnet.config import params_to_dict

    defaults = Params()
    assert (defaults.model.encoder, defaults.model.multiscale_input, defaults.model.attention) == \
        ("swin_v1_l", "cat", "aspp_deformable")
    assert (defaults.train.lr, defaults.train.seed, defaults.train.lr_schedule) == (1e-4, 7, "constant")
    main, finetune = defaults.train.stages
    assert (main.name, main.epochs, finetune.name, finetune.epochs) == ("main", 780, "finetune_region", 20)
    assert main.loss.model_dump() == {"bce": 30, "iou": 0.5, "ssim": 10, "mae": 0, "mse": 0, "ce": 5, "gradient": 1}
    assert finetune.loss.bce == 0 and finetune.decay == {"iou": 0.5, "mae": 0.9}
    assert load_params(write(tmp_path, {})) == defaults
    assert Params.model_validate(params_to_dict(defaults)) == defaults


@pytest.mark.parametrize(
    ("doc", "fragments"),
    [
        ({"data": {"sizee": [256, 256]}}, ["data.sizee", "unknown key", "given [256, 256]"]),
        ({"data": {"size": "big"}}, ["data.size", "given 'big'"]),
        ({"data": {"size": [250, 256]}}, ["data.size", "multiples of 32", "[250, 256]"]),
        ({"data": {"on_bad_sample": "drop"}}, ["data.on_bad_sample", "'fail'", "'quarantine'", "given 'drop'"]),
        ({"data": {"synthetic": {"jpeg_quality": 101}}}, ["data.synthetic.jpeg_quality", "<= 100", "given 101"]),
        ({"data": {"synthetic": {"counts": {"DIS-TR": 0}}}}, ["data.synthetic.counts.DIS-TR", "> 0", "given 0"]),
        ({"data": {"synthetic": {"min_side": 500, "max_side": 300}}}, ["min_side (500)", "max_side (300)"]),
        ({"data": {"val_sets": ["DIS-TR"]}}, ["'DIS-TR'", "train_sets", "val_sets"]),
        ({"gradients": {"mode": "lazy"}}, ["gradients.mode", "given 'lazy'"]),
        ({"register": {"selection_sets": ["DIS-TR"]}}, ["register.selection_sets", "'DIS-TR'", "training set"]),
        ({"register": {"selection_sets": ["DIS-XX"]}}, ["register.selection_sets", "'DIS-XX'", "data.val_sets",
                                                        "data.test_sets"]),
        ({"train": {"stages": [{"name": "small", "epochs": 2, "size": [200, 256]}]}},
         ["train.stages[0].size", "multiples of 32", "[200, 256]"]),
        ({"train": {"bn_recalibration": -1}}, ["train.bn_recalibration", ">= 0", "given -1"]),
        ({"bogus": 1}, ["bogus", "unknown key"]),
    ],
)
def test_invalid_params_name_key_expected_and_given(tmp_path: Path, doc: dict, fragments: list[str]) -> None:
    with pytest.raises(ParamsError) as info:
        load_params(write(tmp_path, doc))
    msg = str(info.value)
    assert str(tmp_path / "params.yaml") in msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_bad_literal_lists_the_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as info:
        load_params(write(tmp_path, {"data": {"on_bad_sample": "drop"}}))
    assert "  data.on_bad_sample: expected one of 'fail', 'quarantine'; given 'drop'" in str(info.value).splitlines()


def test_every_problem_is_listed(tmp_path: Path) -> None:
    with pytest.raises(ParamsError) as info:
        load_params(write(tmp_path, {"data": {"size": [1, 2], "workers": -1, "nope": 3}}))
    msg = str(info.value)
    assert "3 invalid parameter(s)" in msg
    assert "data.workers" in msg and "data.nope" in msg and "data.size" in msg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed", encoding="utf-8")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ParamsError, match="mapping at the top level"):
        load_params(listy)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path: Path) -> None:
    p = write(tmp_path, {})
    params = load_params(p, ["data.size=[512, 384]", "data.on_bad_sample=fail", "data.synthetic.seed=7"])
    assert params.data.size == (512, 384)
    assert params.data.on_bad_sample == "fail"
    assert params.data.synthetic.seed == 7
    with pytest.raises(ParamsError, match=r"data\.size.*given \[500, 384\]"):
        load_params(p, ["data.size=[500, 384]"])
    with pytest.raises(ParamsError, match="expected KEY.PATH=VALUE"):
        load_params(p, ["data.size"])
    with pytest.raises(ParamsError, match="unknown key"):
        load_params(p, ["data.sise=[256,256]"])


def test_params_are_frozen() -> None:
    params = Params()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError for frozen instances
        params.data.size = (64, 64)  # type: ignore[misc]


def test_cli_rejects_bad_params_with_exit_code_2_before_work(tmp_path: Path, venv_bin: Path) -> None:
    out = tmp_path / "synthetic"
    p = write(tmp_path, {"data": {"synthetic": {"out": str(out), "counts": {"DIS-TR": 1}, "jpeg_quality": 5}}})
    proc = subprocess.run([str(venv_bin / "birefnet"), "synthesize", "--params", str(p)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data.synthetic.jpeg_quality" in proc.stderr and "given 5" in proc.stderr
    assert not out.exists()
    proc = subprocess.run([str(venv_bin / "birefnet"), "ingest", "--params", str(p), "--set", "data.size=[3,3]"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.size" in proc.stderr


def _leaf_exists(doc: dict, dotted: str) -> bool:
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_dvc_yaml_params_exist_in_params_yaml(repo_root: Path) -> None:
    params = yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8"))
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    listed = 0
    for name, stage in stages.items():
        for key in stage.get("params", []):
            assert isinstance(key, str), f"stage {name}: params entries must be leaf key strings"
            assert _leaf_exists(params, key), f"stage {name} lists {key!r}, missing in params.yaml"
            listed += 1
    assert listed > 0


def test_cli_help_lists_every_stage(venv_bin: Path) -> None:
    proc = subprocess.run([str(venv_bin / "birefnet"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("synthesize", "ingest", "gradients", "shard", "train", "evaluate", "register"):
        assert cmd in proc.stdout
    for stage in ("synthesize", "ingest", "gradients"):
        proc = subprocess.run([sys.executable, "-m", "birefnet.cli", stage, "--help"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "--params" in proc.stdout and "--set" in proc.stdout
    proc = subprocess.run([str(venv_bin / "birefnet"), "frobnicate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("data:\n  size: [64, 64]\n  workers: 1\n  size: [128, 128]\n", "data.size", "lines 2, 4"),
        ("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", "train", "lines 1, 3"),
        ("train:\n  stages:\n    - name: a\n      epochs: 1\n      epochs: 2\n", "train.stages[0].epochs",
         "lines 4, 5"),
    ],
)
def test_duplicate_keys_are_rejected_with_key_and_lines(tmp_path: Path, text: str, key: str, lines: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert str(path) in msg and f"duplicate key {key!r}" in msg and lines in msg


def test_merge_keys_may_be_overridden_but_overrides_may_not_repeat_keys(tmp_path: Path) -> None:
    from birefnet.config import UniqueKeyLoader

    doc = yaml.load("base: &b {lr: 1, seed: 2}\ntrain: {<<: *b, lr: 3}\n", Loader=UniqueKeyLoader)  # noqa: S506
    assert doc["train"] == {"lr": 3, "seed": 2}
    with pytest.raises(ParamsError, match="duplicate key 'x'"):
        load_params(write(tmp_path, {}), ["data.synthetic.counts={x: 1, x: 2}"])


def test_non_utf8_params_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes("data:\n  root: données\n".encode("latin-1"))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert str(path) in msg and "UTF-8" in msg and "line 2" in msg and "0xe9" in msg


def test_stage_cli_exits_2_on_duplicate_keys_and_non_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from birefnet.stages.synthesize import main

    out = tmp_path / "synthetic"
    dup = tmp_path / "dup.yaml"
    dup.write_text(f"data:\n  synthetic:\n    out: {out}\n    seed: 1\n    seed: 2\n", encoding="utf-8")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(f"data:\n  synthetic:\n    out: {out}\n# \xe9t\xe9\n".encode("latin-1"))
    assert main(["--params", str(dup)]) == 2
    err = capsys.readouterr().err
    assert str(dup) in err and "'data.synthetic.seed'" in err and "lines 4, 5" in err
    assert main(["--params", str(latin)]) == 2
    err = capsys.readouterr().err
    assert str(latin) in err and "UTF-8" in err and "line 4" in err
    assert not out.exists()


def test_serving_params_default_validation_and_documentation(tmp_path: Path, repo_root: Path) -> None:
    assert Params().serving.max_image_pixels == 40_000_000
    assert load_params(repo_root / "params.yaml").serving.max_image_pixels == 40_000_000
    with pytest.raises(ParamsError, match=r"serving\.max_image_pixels: expected a number > 0; given 0"):
        load_params(write(tmp_path, {"serving": {"max_image_pixels": 0}}))
    with pytest.raises(ParamsError, match=r"serving\.max_pixels: unknown key"):
        load_params(write(tmp_path, {"serving": {"max_pixels": 5}}))
    with pytest.raises(Exception):  # noqa: B017 - frozen
        Params().serving.max_image_pixels = 1  # type: ignore[misc]
    line = next(t for t in (repo_root / "params.yaml").read_text(encoding="utf-8").splitlines()
                if t.strip().startswith("max_image_pixels: 40000000"))
    assert "#" in line and "refused" in line


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        ({"context_levels": 4}, ["model.context_levels", "<= 3", "given 4"]),
        ({"attention": "bogus"}, ["model.attention", "'aspp_deformable'", "given 'bogus'"]),
        ({"encoder": "a b"}, ["model.encoder", "without spaces"]),
        ({"outward_reference": True, "multistage_supervision": False}, ["model:", "needs multistage_supervision"]),
        ({"atention": "none"}, ["model.atention", "unknown key"]),
    ],
)
def test_model_group_errors_name_the_key(tmp_path: Path, model: dict, fragments: list[str]) -> None:
    with pytest.raises(ParamsError) as info:
        load_params(write(tmp_path, {"model": model}))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_model_group_is_the_model_packages_config(repo_root: Path) -> None:
    """``ModelParams`` is generated from ``birefnet.models.config.ModelConfig``: same keys, defaults and checks, and
    the same JSON that model files embed."""
    import dataclasses

    from birefnet.config import ModelParams
    from birefnet.models.config import ModelConfig

    assert list(ModelParams.model_fields) == [spec.name for spec in dataclasses.fields(ModelConfig)]
    assert ModelParams().to_config() == ModelConfig()
    params = load_params(repo_root / "params.yaml").model
    assert params.to_config().to_json() == params.model_dump_json()
    assert ModelParams.from_config(params.to_config()) == params
    changed = ModelParams(encoder="pvt_v2_b0", attention_strides=[32], drop_path_rate=0.25, encoder_weights="w.pth")
    assert changed.to_config().to_json() == changed.model_dump_json()


def test_gate_sets_are_the_selection_sets_else_the_test_sets() -> None:
    from birefnet.config import Params

    default = Params()
    assert default.gate_sets() == ["DIS-VD"] and default.selection_only_sets() == ["DIS-VD"]
    on_tests = Params.model_validate({"register": {"selection_sets": []}})
    assert on_tests.gate_sets() == ["DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"]
    assert on_tests.selection_only_sets() == []
    # a selection set that is also a test set is scored once, as a test set
    mixed = Params.model_validate({"register": {"selection_sets": ["DIS-VD", "DIS-TE1"]}})
    assert mixed.gate_sets() == ["DIS-VD", "DIS-TE1"] and mixed.selection_only_sets() == ["DIS-VD"]
