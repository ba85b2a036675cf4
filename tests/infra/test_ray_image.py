"""The Ray image holds what the cluster commands read (#21: the RayJob's `--params` used to name a missing file).

Docker is not usable on the CI machine, so the image's file list is computed from the Dockerfile's WORKDIR and
COPY lines over the repository's tracked files, then every path the RayJob and cluster-launcher commands use is
looked up in it, and their `--set` overrides are validated against the image's params.yaml.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import yaml

from birefnet.config import load_params

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "ray" / "Dockerfile"


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


def image_files(dockerfile: Path = DOCKERFILE) -> set[PurePosixPath]:
    """Absolute paths of the project files the image gets (COPY sources expanded over the tracked files)."""
    workdir = PurePosixPath("/")
    files: set[PurePosixPath] = set()
    tracked = _tracked_files()
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("WORKDIR", "COPY"):
            continue
        if words[0].upper() == "WORKDIR":
            workdir = workdir / words[1]
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        sources, dest = args[:-1], workdir / args[-1]
        for source in sources:
            source = source.rstrip("/")
            matched = [p for p in tracked if p == source or p.startswith(source + "/")]
            assert matched, f"{dockerfile.name}: COPY {source}: nothing tracked at that path"
            for path in matched:
                rel = PurePosixPath(path).relative_to(source) if path != source else PurePosixPath(Path(path).name)
                target = dest / rel if (path != source or args[-1].endswith("/")) else dest
                files.add(target)
    return files


def _workdir() -> PurePosixPath:
    return PurePosixPath([ln.split()[1] for ln in DOCKERFILE.read_text().splitlines()
                          if ln.upper().startswith("WORKDIR ")][-1])


def _cluster_commands() -> list[list[str]]:
    """The `birefnet ...` command lines of the RayJob entrypoint and the cluster launcher's `ray exec` example."""
    commands = []
    for doc in yaml.safe_load_all((REPO / "infra" / "ray" / "rayjob.yaml").read_text()):
        if doc and doc.get("kind") == "RayJob":
            commands.append(shlex.split(doc["spec"]["entrypoint"]))
    text = (REPO / "infra" / "ray" / "cluster.yaml").read_text()
    comment = " ".join(ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("#"))
    for quoted in re.findall(r'ray exec \S+ "([^"]+)"', comment.replace("\\ ", " ")):
        commands.append(shlex.split(quoted))
    assert len(commands) >= 2, commands
    return commands


def _params_path(argv: list[str]) -> PurePosixPath:
    path = PurePosixPath(argv[argv.index("--params") + 1]) if "--params" in argv else PurePosixPath("params.yaml")
    return path if path.is_absolute() else _workdir() / path


def test_image_has_the_package_params_and_hooks() -> None:
    files = image_files()
    root = _workdir()
    for rel in ("params.yaml", "dvc.yaml", "pyproject.toml", "requirements.lock", "birefnet/cli.py",
                "pipelines/__init__.py", "infra/ray/pyhooks/sitecustomize.py", "configs/paper-dis5k.yaml"):
        assert root / rel in files, f"{DOCKERFILE}: {root / rel} is not copied into the image"


def test_every_path_the_cluster_commands_read_is_in_the_image() -> None:
    files = image_files()
    for argv in _cluster_commands():
        assert argv[:2] == ["birefnet", "train"], argv
        assert _params_path(argv) in files, f"{' '.join(argv)}: {_params_path(argv)} is not in the image"


def test_cluster_overrides_validate_against_the_image_params(tmp_path: Path) -> None:
    for argv in _cluster_commands():
        overrides = [argv[i + 1] for i, word in enumerate(argv) if word == "--set"]
        params_file = REPO / _params_path(argv).relative_to(_workdir())
        params = load_params(params_file, overrides)
        assert params.train.use_gpu is True


def test_image_file_list_notices_a_missing_copy(tmp_path: Path) -> None:
    # the check above can fail: drop params.yaml from the COPY line and it is gone from the list
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace(" params.yaml", ""))
    assert _workdir() / "params.yaml" not in image_files(broken)
    assert _workdir() / "dvc.yaml" in image_files(broken)
