"""``birefnet export onnx``: dynamic batch and H/W, onnxruntime parity with PyTorch on two input sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from birefnet.commands.export import main
from birefnet.inference.export import PROB_TOLERANCE, check_parity, export_onnx, parity_shapes
from birefnet.models import BiRefNet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def dynamic_onnx(tiny_model: BiRefNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny_model.set_deform_impl("torchvision")  # not exportable: the export must switch to sampling and back
    try:
        path = export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "dynamic.onnx", (64, 96), dynamic_hw=True)
        assert {m.impl for m in tiny_model.deformable_convs()} == {"torchvision"}
    finally:
        tiny_model.set_deform_impl("auto")
    return path


def test_dynamic_export_has_symbolic_batch_height_width(dynamic_onnx: Path) -> None:
    graph = onnx.load(str(dynamic_onnx)).graph
    (image,) = graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    ops = {node.op_type for node in graph.node}
    assert "GridSample" in ops  # the deformable convolutions, as standard ops


def test_parity_on_two_input_sizes_both_deform_kernels(tiny_model: BiRefNet, dynamic_onnx: Path) -> None:
    shapes = [(2, 3, 96, 64), (1, 3, 128, 160)]
    for impl in ("sampling", "torchvision"):
        tiny_model.set_deform_impl(impl)
        try:
            checks = check_parity(tiny_model, dynamic_onnx, shapes)
        finally:
            tiny_model.set_deform_impl("auto")
        assert [c.shape for c in checks] == shapes
        for check in checks:
            assert check.ok, check.describe()
            assert check.max_abs_logits < 1e-4, check.describe()


def test_parity_check_catches_a_different_model(tiny_model: BiRefNet, dynamic_onnx: Path) -> None:
    from tests.inference.tiny_model import build_tiny_model

    other, _ = build_tiny_model(seed=1)
    (check,) = check_parity(other, dynamic_onnx, [(1, 3, 96, 64)])
    assert not check.ok and check.max_abs_probs > PROB_TOLERANCE
    assert "FAILED" in check.describe()


def test_cli_fixed_size_export_keeps_a_dynamic_batch(tiny_model_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fixed.onnx"
    assert main(["onnx", "--model", str(tiny_model_file), "--out", str(out), "--size", "96", "64", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "96x64, dynamic batch)" in printed
    assert printed.count(" ok") == len(parity_shapes((96, 64), dynamic_hw=False)) == 2
    assert "parity 2x3x64x96" in printed and "tolerance 1e-03" in printed
    (image,) = onnx.load(str(out)).graph.input
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 3, 64, 96]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((3, 3, 64, 96), np.float32)})[0].shape == (3, 1, 64, 96)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"image": np.zeros((1, 3, 96, 96), np.float32)})
    assert main(["onnx", "--model", str(tmp_path / "none.safetensors"), "--out", str(out)]) == 2


def test_export_rejects_sizes_and_opsets(tiny_model: BiRefNet, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        export_onnx(tiny_model, tmp_path / "x.onnx", (60, 64))
    with pytest.raises(ValueError, match="GridSample"):
        export_onnx(tiny_model, tmp_path / "x.onnx", (64, 64), opset=15)
    assert torch.is_grad_enabled()


def test_swin_encoder_exports_with_dynamic_batch(tmp_path: Path) -> None:
    """The Swin encoder's SDPA window attention exports (traced: one call with the mask repeated per image)
    and the graph runs batches other than the traced one."""
    from birefnet.inference.export import export_and_check
    from birefnet.models import create_model

    torch.manual_seed(0)
    model = create_model("birefnet_test", encoder="swin_v1_t", attention="none").eval()
    report = export_and_check(model, tmp_path / "swin.onnx", (64, 64))
    assert [c.shape[0] for c in report.checks] == [1, 2]
    for check in report.checks:
        assert check.error is None, check.error
        assert check.max_abs_probs <= PROB_TOLERANCE
