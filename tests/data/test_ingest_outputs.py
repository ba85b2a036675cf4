"""Ingest outputs appear together or not at all, and a failed ingest leaves no manifest for later stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from birefnet.publish import CRASH_ENV
from birefnet.stages.common import read_manifest

RNG = np.random.default_rng(3)


def _pair(root: Path, set_name: str, stem: str) -> None:
    (root / set_name / "im").mkdir(parents=True, exist_ok=True)
    (root / set_name / "gt").mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / set_name / "im" / f"{stem}.jpg")
    mask = np.zeros((24, 32), np.uint8)
    mask[6:18, 8:24] = 255
    Image.fromarray(mask).save(root / set_name / "gt" / f"{stem}.png")


def _ingest(tmp_path: Path, root: Path, crash: str | None = None,
            mode: str = "quarantine") -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    params.write_text("{}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash:
        env[CRASH_ENV] = f"ingest:{crash}"
    cmd = [sys.executable, "-m", "birefnet.stages.ingest", "-q", "--params", str(params),
           "--set", f"data.root={root}", "--set", f"data.prepared={tmp_path / 'prepared'}",
           "--set", f"data.on_bad_sample={mode}", "--set", "data.train_sets=[DIS-TR]",
           "--set", "data.val_sets=[]", "--set", "data.test_sets=[]", "--set", "data.workers=1",
           "--set", "register.selection_sets=[]"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _state(prepared: Path) -> dict[str, object]:
    """What each output says about the run that wrote it (None: absent)."""
    manifest, classes, quarantine = (prepared / n for n in ("manifest.jsonl", "classes.json", "quarantine.json"))
    records = [json.loads(x) for x in manifest.read_text("utf-8").splitlines()] if manifest.is_file() else None
    return {"manifest": None if records is None else len(records),
            "manifest_classes": None if records is None else sorted({r["class_name"] for r in records}),
            "classes": json.loads(classes.read_text("utf-8")) if classes.is_file() else None,
            "accepted": json.loads(quarantine.read_text("utf-8"))["accepted"] if quarantine.is_file() else None}


OLD = {"manifest": 2, "manifest_classes": ["Bag"], "classes": ["Bag"], "accepted": 2}
NEW = {"manifest": 3, "manifest_classes": ["Bag", "Cat"], "classes": ["Bag", "Cat"], "accepted": 3}


@pytest.mark.parametrize("point", ["committed", "aside1", "aside2", "swap1", "swap2"])
def test_ingest_killed_while_publishing_leaves_old_or_new_set(tmp_path: Path, point: str) -> None:
    root = tmp_path / "raw"
    _pair(root, "DIS-TR", "1#G#1#Bag#a")
    _pair(root, "DIS-TR", "1#G#1#Bag#b")
    assert _ingest(tmp_path, root).returncode == 0
    assert _state(tmp_path / "prepared") == OLD
    _pair(root, "DIS-TR", "2#G#1#Cat#c")
    proc = _ingest(tmp_path, root, crash=point)
    assert proc.returncode == 137, proc.stderr[-2000:]
    state = _state(tmp_path / "prepared")
    # each output is absent or from one and the same run: never a new manifest beside an old class list
    assert all(v is None or v == OLD[k] for k, v in state.items()) or \
        all(v is None or v == NEW[k] for k, v in state.items()), (point, state)
    read_manifest(tmp_path / "prepared" / "manifest.jsonl")  # a reader (gradients, shard) finishes the publication
    assert _state(tmp_path / "prepared") == NEW
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["classes.json", "manifest.jsonl",
                                                                        "quarantine.json"]


def test_ingest_killed_before_commit_keeps_old_set_and_rerun_publishes(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _pair(root, "DIS-TR", "1#G#1#Bag#a")
    _pair(root, "DIS-TR", "1#G#1#Bag#b")
    assert _ingest(tmp_path, root).returncode == 0
    _pair(root, "DIS-TR", "2#G#1#Cat#c")
    assert _ingest(tmp_path, root, crash="staged").returncode == 137
    assert _state(tmp_path / "prepared") == OLD
    assert _ingest(tmp_path, root).returncode == 0
    assert _state(tmp_path / "prepared") == NEW
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["classes.json", "manifest.jsonl",
                                                                        "quarantine.json"]


def test_failed_ingest_removes_previous_manifest_and_shard_refuses(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _pair(root, "DIS-TR", "1#G#1#Bag#a")
    _pair(root, "DIS-TR", "1#G#1#Bag#b")
    assert _ingest(tmp_path, root, mode="fail").returncode == 0
    bad = root / "DIS-TR" / "im" / "1#G#1#Bag#b.jpg"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated after ingest accepted it
    proc = _ingest(tmp_path, root, mode="fail")
    assert proc.returncode == 3
    manifest = tmp_path / "prepared" / "manifest.jsonl"
    assert str(bad) in proc.stderr and "Removed the previous ingest outputs" in proc.stderr and str(manifest) in \
        proc.stderr
    assert _state(tmp_path / "prepared") == {"manifest": None, "manifest_classes": None, "classes": None,
                                             "accepted": None}
    params = tmp_path / "shard.yaml"
    params.write_text("{}\n", encoding="utf-8")
    shard = subprocess.run([sys.executable, "-m", "birefnet.stages.shard", "-q", "--params", str(params),
                            "--set", f"data.prepared={tmp_path / 'prepared'}", "--set", f"shard.out={tmp_path / 's'}",
                            "--set", "gradients.mode=on_the_fly"], capture_output=True, text=True, timeout=120)
    assert shard.returncode == 3 and f"{manifest}: manifest not found" in shard.stderr
