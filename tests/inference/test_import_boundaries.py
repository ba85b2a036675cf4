"""Inference stays outside training: importing and running it loads neither ``birefnet.training`` nor Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.inference.tiny_model import TEST_SIZE

REPO = Path(__file__).resolve().parents[2]

#: Runs in a fresh interpreter: every inference module imported, a predict on the tiny model (in memory and
#: through ``birefnet predict``), then the loaded modules that inference must not pull in.
SCRIPT = """
import json, sys
import numpy as np
from PIL import Image

import birefnet.inference
from birefnet.commands import export as export_command, predict as predict_command
from birefnet.inference import export, files, foreground, processing, serving
from birefnet.inference.predict import load_predictor, predict_images

model_file, folder, width, height = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model, size = load_predictor(model_file, size=(width, height))
(mask,) = predict_images(model, [np.zeros((20, 30, 3), np.uint8)], size)
Image.fromarray(np.full((21, 17, 3), 200, np.uint8)).save(f"{folder}/a.png")
code = predict_command.main([f"{folder}/a.png", "--model", model_file, "--out", f"{folder}/out", "--size",
                             str(width), str(height), "--device", "cpu", "--no-progress", "-q"])
forbidden = sorted(name for name in sys.modules if name.split(".")[0] == "ray" or name == "birefnet.training"
                   or name.startswith("birefnet.training."))
print(json.dumps({"mask": list(mask.shape), "code": code, "forbidden": forbidden}))
"""


def test_inference_imports_neither_training_nor_ray(tiny_model_file: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_file), str(tmp_path), *map(str, TEST_SIZE)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["mask"] == [20, 30] and outcome["code"] == 0
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "a_cutout.png").is_file()
    assert outcome["forbidden"] == [], f"inference loaded {outcome['forbidden']}"
