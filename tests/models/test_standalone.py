"""``birefnet.models`` stands alone: it builds, saves and loads without the pipeline, and models carry their config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import birefnet
from birefnet.models import build_model, create_model, load_model, save_model
from birefnet.models.config import ModelConfig, ModelConfigError
from birefnet.models.io import PARAMS_KEY, read_metadata, unwrap_model

#: Modules that importing and using ``birefnet.models`` must not load (pipeline code and its frameworks).
PIPELINE_MODULES = ("birefnet.config", "pydantic", "yaml", "mlflow", "ray", "prefect")

#: Runs in a fresh interpreter: records which file first imports each pipeline module, then imports
#: ``birefnet.models``, builds, saves and loads the tiny model, and prints ``{module: importing file}``.
STANDALONE_SCRIPT = """
import json, sys, traceback
from pathlib import Path

WATCHED = set(json.loads(sys.argv[2]))
importers = {}

class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED and name not in importers:
            frames = [f.filename for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<")]
            importers[name] = frames[-1] if frames else "?"
        return None

sys.meta_path.insert(0, Recorder())
import birefnet.models
from birefnet.models import create_model, load_model, save_model
model = create_model("birefnet_test", attention="none")
path = save_model(model, Path(sys.argv[1]) / "model.safetensors")
loaded = load_model(path)
assert loaded.config == model.config, (loaded.config, model.config)
print(json.dumps({name: importers.get(name, "?") for name in WATCHED if name in sys.modules}))
"""


def test_models_import_build_save_load_without_the_pipeline(tmp_path: Path) -> None:
    """No birefnet module imports the pipeline. ``yaml`` is the one exception allowed, and only when a third-party
    dependency imports it (timm -> huggingface_hub does, at import)."""
    done = subprocess.run([sys.executable, "-c", STANDALONE_SCRIPT, str(tmp_path), json.dumps(PIPELINE_MODULES)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    loaded: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    package = str(Path(birefnet.__file__).parent)
    assert set(loaded) <= {"yaml"}, loaded
    assert all(not importer.startswith(package) and "site-packages" in importer for importer in loaded.values()), loaded


def test_config_module_needs_no_torch() -> None:
    """``birefnet.config`` reuses ``birefnet.models.config``; that import must not pull torch in."""
    script = "import sys, birefnet.models.config, birefnet.imaging; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_save_without_params_round_trips_the_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(encoder="test_convnext", attention="aspp", attention_strides=[32, 16], num_classes=7,
                         auxiliary_classification=True, multiscale_input="add")
    model = build_model(config).eval()
    assert model.config is config
    path = save_model(model, tmp_path / "model.safetensors")
    assert json.loads(read_metadata(path)[PARAMS_KEY]) == json.loads(config.to_json())
    loaded = load_model(path)
    assert loaded.config == config and loaded.config.attention_strides == (32, 16)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(image).logits, model(image).logits, rtol=0, atol=0)


def test_create_model_carries_the_variant_config() -> None:
    model = create_model("birefnet_test", attention="none", deform_impl="sampling")
    assert model.config == ModelConfig(encoder="test_convnext", attention="none", deform_impl="sampling")
    with pytest.raises(ModelConfigError, match="outward_reference needs multistage_supervision"):
        create_model("birefnet_test", multistage_supervision=False)


def test_old_call_form_and_wrappers(tmp_path: Path) -> None:
    """``save_model(model, config, path)`` still works (it embeds the given config); wrappers are unwrapped."""
    config = ModelConfig(encoder="test_convnext", attention="none", multiscale_input="none")
    model = build_model(config)
    other = config.replace(deform_impl="torchvision")
    path = save_model(model, other, tmp_path / "old.safetensors")
    assert load_model(path).config == other

    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = Wrapper(model)
    assert unwrap_model(wrapped) is model
    assert load_model(save_model(wrapped, tmp_path / "wrapped.safetensors")).config == config


def test_model_without_config_cannot_be_saved_without_one(tmp_path: Path) -> None:
    from birefnet.models import BiRefNet

    bare = BiRefNet(encoder="test_convnext", attention="none", multiscale_input="none")
    assert bare.config is None
    with pytest.raises(ValueError, match="carries no model config"):
        save_model(bare, tmp_path / "bare.safetensors")


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        ({"context_levels": 4}, ["context_levels", "<= 3", "given 4"]),
        ({"attention": "bogus"}, ["attention", "'aspp'", "given 'bogus'"]),
        ({"inward_reference": "yes"}, ["inward_reference", "true or false", "given 'yes'"]),
        ({"encoder": "a b"}, ["encoder", "without spaces"]),
        ({"squeeze_block": "none"}, ["squeeze_block 'none' needs context_levels 0"]),
        ({"bogus": 1}, ["unknown model key", "'bogus'"]),
    ],
)
def test_model_config_errors_name_key_expected_and_given(values: dict, fragments: list[str]) -> None:
    with pytest.raises(ModelConfigError) as info:
        ModelConfig.from_dict(values)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_model_config_dict_round_trip() -> None:
    config = ModelConfig(encoder_weights="weights/encoder.pth", drop_path_rate=0, attention_strides=[4])
    assert config.encoder_weights == Path("weights/encoder.pth") and config.drop_path_rate == 0.0
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
