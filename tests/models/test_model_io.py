"""Weights I/O: safetensors with embedded params, ``birefnet.load_model``, local encoder weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import birefnet
from birefnet.models import build_model, save_model
from birefnet.models.config import ModelConfig
from birefnet.models.io import PARAMS_KEY, ModelFileError, read_model_config

CONFIG = ModelConfig(encoder="test_convnext", attention="aspp", multiscale_input="cat", auxiliary_classification=True)


def test_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    path = save_model(model, tmp_path / "sub" / "model.safetensors")
    assert read_model_config(path) == CONFIG
    loaded = birefnet.load_model(path)
    assert not loaded.training and loaded.config == CONFIG
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image).logits, model(image).logits, rtol=0, atol=0)
    overridden = birefnet.load_model(path, deform_impl="torchvision", gradient_checkpointing=True)
    assert overridden.decoder.gradient_checkpointing
    assert overridden.config == CONFIG.replace(deform_impl="torchvision", gradient_checkpointing=True)


def test_equal_models_are_byte_identical_files(tmp_path: Path) -> None:
    """The safetensors writer orders metadata from a hash map; save_model sorts it, so DVC sees one hash."""
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    extra = {f"key.{i}": f"value {i}" for i in range(12)}
    paths = [save_model(model, tmp_path / f"{n}.safetensors", extra=dict(items))
             for n, items in enumerate([list(extra.items()), list(reversed(extra.items())), list(extra.items())])]
    contents = [p.read_bytes() for p in paths]
    assert contents[0] == contents[1] == contents[2]
    from safetensors import safe_open

    with safe_open(str(paths[1]), framework="pt") as handle:
        assert {k: v for k, v in (handle.metadata() or {}).items() if k.startswith("key.")} == extra
    assert read_model_config(paths[1]) == CONFIG


def test_load_rejects_foreign_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="model_params"):
        birefnet.load_model(path)


def test_load_names_convert_upstream_for_an_upstream_safetensors(tmp_path: Path) -> None:
    """A Hugging Face model.safetensors has upstream's key names and no params: say how to use it."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"bb.patch_embed.proj.weight": torch.zeros(2, 3, 4, 4), "squeeze_module.0.conv_in.weight":
               torch.zeros(1), "decoder.decoder_block4.conv_in.weight": torch.zeros(1)}, str(path),
              metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="convert-upstream") as info:
        birefnet.load_model(path)
    assert "upstream BiRefNet's key layout" in str(info.value) and str(path) in str(info.value)


def test_encoder_weights_from_local_file(tmp_path: Path) -> None:
    reference = timm.create_model("test_convnext", pretrained=False)
    path = tmp_path / "test_convnext.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(encoder="test_convnext", encoder_weights=path, attention="none"))
    stem = dict(model.encoder.model.named_parameters())["stem_0.weight"]
    assert torch.equal(stem, reference.stem[0].weight)


def test_missing_encoder_weights_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_model(ModelConfig(encoder="test_convnext", encoder_weights=tmp_path / "nope.pth"))


@pytest.mark.parametrize("keep", [0, 7, 200, -1])
def test_truncated_file_is_a_model_file_error_naming_it(tmp_path: Path, keep: int) -> None:
    path = save_model(build_model(CONFIG), tmp_path / "model.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep] if keep >= 0 else data[: len(data) // 2])
    with pytest.raises(ModelFileError) as info:
        birefnet.load_model(cut)
    msg = str(info.value)
    assert str(cut) in msg and "not a readable safetensors file" in msg and f"({cut.stat().st_size} bytes)" in msg
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        read_model_config(cut)


def test_tensors_that_do_not_fit_the_params_are_a_model_file_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in build_model(CONFIG).state_dict().items()}
    state.pop(next(iter(state)))
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path), metadata={PARAMS_KEY: CONFIG.to_json()})
    with pytest.raises(ModelFileError, match="do not fit the architecture"):
        birefnet.load_model(path)
    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad_json), metadata={PARAMS_KEY: "{not json"})
    with pytest.raises(ModelFileError, match="not valid model params"):
        read_model_config(bad_json)
