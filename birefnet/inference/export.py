"""Export BiRefNet to ONNX and check it against PyTorch with onnxruntime (the library behind ``birefnet export``).

BiRefNet (Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR
2024) reads features through modulated deformable convolutions. ``torchvision.ops.deform_conv2d`` has no
ONNX symbolic (upstream's exports go through a third-party exporter that unrolls it into gathers, which is
what makes them slow); the export therefore switches every layer to the ``sampling`` kernel
(``birefnet.models.deform``: ``GridSample`` + a 1x1 ``Conv``, standard ops, same parameters, same function),
which exports cleanly with a dynamic batch and, for encoders whose shapes are traced symbolically, dynamic
height and width.

The graph has one input ``image`` ``(B, 3, H, W)`` float32 ImageNet-normalised RGB and one output
``logits`` ``(B, 1, H, W)``. It is written with the TorchScript exporter (``dynamo=False``), which needs
only ``onnx``; ``torch.export``'s exporter would also need ``onnxscript``. The command line is
:mod:`birefnet.commands.export`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from birefnet.inference.processing import check_size

if TYPE_CHECKING:
    import torch

    from birefnet.models.birefnet import BiRefNet

#: Default ONNX opset (GridSample needs 16; 17 is what onnxruntime has optimised longest).
DEFAULT_OPSET = 17
#: Parity tolerance on the sigmoid probabilities (max |p_onnx - p_torch|): a quarter of one 8-bit grey level.
PROB_TOLERANCE = 1e-3
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def _logits_only(model: BiRefNet) -> torch.nn.Module:
    """``model`` behind a module returning only ``model(image).logits`` (ONNX outputs must be tensors)."""
    from torch import nn

    class LogitsOnly(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.inner(image).logits

    return LogitsOnly(model).eval()


@dataclass
class ParityCheck:
    """onnxruntime vs PyTorch on one input shape.

    Attributes:
        shape: input ``(B, 3, H, W)``.
        max_abs_logits: max |logits difference|.
        max_abs_probs: max |sigmoid difference|, compared with ``tolerance``.
        tolerance: the bound on ``max_abs_probs``.
        error: why onnxruntime could not run this shape, if it could not.
    """

    shape: tuple[int, ...]
    max_abs_logits: float = float("nan")
    max_abs_probs: float = float("nan")
    tolerance: float = PROB_TOLERANCE
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when onnxruntime ran and the probabilities agree within ``tolerance``."""
        return self.error is None and self.max_abs_probs <= self.tolerance

    def describe(self) -> str:
        """One line for the console."""
        head = f"parity {'x'.join(map(str, self.shape))}: "
        if self.error:
            return head + f"FAILED ({self.error})"
        verdict = "ok" if self.ok else "FAILED"
        return (head + f"max |d logits| = {self.max_abs_logits:.2e}, max |d sigmoid| = {self.max_abs_probs:.2e} "
                f"(tolerance {self.tolerance:.0e}) {verdict}")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it compared.

    Attributes:
        path: the ``.onnx`` file.
        size: export resolution (width, height).
        dynamic_hw: whether H and W are dynamic axes (the batch always is).
        opset: ONNX opset.
        seconds: export time.
        checks: parity results (empty with ``check=False``).
    """

    path: Path
    size: tuple[int, int]
    dynamic_hw: bool
    opset: int
    seconds: float
    checks: list[ParityCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every parity check passed."""
        return all(c.ok for c in self.checks)


def export_onnx(model: BiRefNet, out: str | Path, size: tuple[int, int], *, opset: int = DEFAULT_OPSET,
                dynamic_hw: bool = False) -> Path:
    """Write ``model`` as ONNX (dynamic batch; dynamic H/W with ``dynamic_hw``).

    The model's deformable convolutions are switched to the ``sampling`` kernel and every layer runs as stated
    (``BiRefNet.layers_as_stated``: no kernels computed from the weights) for the trace; both are restored
    afterwards. The model is traced on CPU in fp32.

    Args:
        model: a BiRefNet.
        out: the ``.onnx`` path (parent folders created).
        size: export resolution (width, height), multiples of 32; the graph's fixed H/W without ``dynamic_hw``.
        opset: ONNX opset (at least 16, for GridSample).
        dynamic_hw: make height and width dynamic axes too (check them with :func:`check_parity`: an encoder
            that computes shapes in Python, such as Swin's window padding, bakes the traced size in).

    Returns:
        The path written.
    """
    import torch

    width, height = check_size(size)
    if opset < 16:
        raise ValueError(f"opset must be at least 16 (GridSample), given {opset}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    previous = {module: module.impl for module in model.deformable_convs()}
    was_training = model.training
    model.cpu().eval()
    model.set_deform_impl("sampling")
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    try:
        # The TorchScript exporter needs kernels of known shape: no kernels computed from the weights.
        with torch.no_grad(), warnings.catch_warnings(), model.layers_as_stated():
            # The tracer warns on every shape comparison (resize identities, stride checks): they hold for all
            # sizes that are multiples of 32, which is what the parity check at a second size verifies.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(
                _logits_only(model), (torch.zeros(1, 3, height, width),), str(out), dynamo=False,
                opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes}, do_constant_folding=True,
            )
    finally:
        for module, impl in previous.items():
            module.impl = impl
        model.to(device).train(was_training)
    import onnx

    onnx.checker.check_model(str(out))
    return out


def check_parity(model: BiRefNet, onnx_path: str | Path, shapes: Sequence[tuple[int, int, int, int]], *,
                 tolerance: float = PROB_TOLERANCE, seed: int = 0) -> list[ParityCheck]:
    """Compare onnxruntime (CPU) with the PyTorch model (CPU, fp32, its own deform kernel) on random inputs.

    Args:
        model: the PyTorch model that was exported.
        onnx_path: the exported file.
        shapes: input shapes ``(B, 3, H, W)`` to try.
        tolerance: bound on the max absolute difference of the sigmoid probabilities.
        seed: input generator seed.

    Returns:
        One :class:`ParityCheck` per shape.
    """
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    was_training = model.training
    model.cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    checks = []
    try:
        for shape in shapes:
            check = ParityCheck(tuple(shape), tolerance=tolerance)
            image = torch.randn(*shape, generator=generator)
            with torch.no_grad():
                expected = model(image).logits.float()
            try:
                (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: image.numpy()})
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types per failure
                check.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                checks.append(check)
                continue
            got_t = torch.from_numpy(np.asarray(got))
            if got_t.shape != expected.shape:
                check.error = f"output shape {tuple(got_t.shape)}, PyTorch gives {tuple(expected.shape)}"
            else:
                check.max_abs_logits = float((got_t - expected).abs().max())
                check.max_abs_probs = float((got_t.sigmoid() - expected.sigmoid()).abs().max())
            checks.append(check)
    finally:
        model.to(device).train(was_training)
    return checks


def parity_shapes(size: tuple[int, int], dynamic_hw: bool) -> list[tuple[int, int, int, int]]:
    """Shapes the export is checked on: batch 1 and 2 at ``size`` (dynamic batch), plus a second (H, W) with
    ``dynamic_hw`` (the sides swapped, or 32 px more in height for a square size)."""
    width, height = size
    shapes = [(1, 3, height, width), (2, 3, height, width)]
    if dynamic_hw:
        other = (width, height) if width != height else (height + 32, width)
        shapes.append((1, 3, *other))
    return shapes


def export_and_check(model: BiRefNet, out: str | Path, size: tuple[int, int], *, opset: int = DEFAULT_OPSET,
                     dynamic_hw: bool = False, check: bool = True, tolerance: float = PROB_TOLERANCE
                     ) -> ExportReport:
    """:func:`export_onnx`, then :func:`check_parity` on :func:`parity_shapes`."""
    start = time.perf_counter()
    path = export_onnx(model, out, size, opset=opset, dynamic_hw=dynamic_hw)
    report = ExportReport(path=path, size=(int(size[0]), int(size[1])), dynamic_hw=dynamic_hw, opset=opset,
                          seconds=time.perf_counter() - start)
    if check:
        report.checks = check_parity(model, path, parity_shapes(report.size, dynamic_hw), tolerance=tolerance)
    return report
