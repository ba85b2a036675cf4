"""Tiny configuration and a temporary git clone of the working tree for the flow tests (imported, not a conftest)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

# Every stage in seconds on 2 cores: 20 small images at 64x64, a 1-epoch-per-stage test encoder.
TINY: dict[str, Any] = {
    "data": {"size": [64, 64], "workers": 1,
             "synthetic": {"counts": {"DIS-TR": 8, "DIS-VD": 3, "DIS-TE1": 2, "DIS-TE2": 2, "DIS-TE3": 2,
                                      "DIS-TE4": 2}, "min_side": 96, "max_side": 144}},
    "model": {"encoder": "test_convnext", "deform_impl": "sampling"},
    "loader": {"batch_size": 2, "workers": 0, "augment": ["flip"]},
    "train": {"threads_per_worker": 1, "warmup_epochs": 0, "lr_schedule": "constant",
              "stages": [{"name": "main", "epochs": 1},
                         {"name": "ft", "epochs": 1, "loss": {"bce": 0, "iou": 0.5, "ssim": 10}}]},
    "evaluate": {"workers": 1, "hce": False, "hard_samples": 1, "crops": 1},
}


OUTPUT_DIRS = {"data", "models", "metrics", "reports", "registry", "checkpoints", "mlartifacts"}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (lists and scalars replace)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_params(repo: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repository's params.yaml with :data:`TINY` (and ``extra``) merged in."""
    doc = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    return merge(merge(doc, TINY), extra or {})


def make_clone(repo: Path, dest: Path, params: dict[str, Any]) -> Path:
    """Copy the working tree as git sees it (tracked + untracked, not ignored) into a new committed git repo.

    The clone starts with no pipeline outputs and no dvc.lock; ``params`` replaces params.yaml.
    """
    def git_files(*flags: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", *flags, "-z"], cwd=repo, check=True, capture_output=True).stdout
        return [f for f in out.decode().split("\0") if f]

    for rel in git_files("--cached", "--others", "--exclude-standard"):
        # pipeline outputs in the shared working tree (even ones staged there by accident) stay out of the clone
        if rel.split("/", 1)[0] in OUTPUT_DIRS and "/" in rel and not rel.endswith(".gitignore"):
            continue
        src = repo / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], cwd=dest, check=True)
    return dest
