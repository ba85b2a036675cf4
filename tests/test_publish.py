"""All-or-nothing stage outputs: a process killed at every point of a publication leaves the old set or the new
set (after :func:`finish_pending`), never a mix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from birefnet.publish import CRASH_ENV, OutputSet, PublishError, finish_pending, journal_path, retract

POINTS = ["staged", "committed", "aside1", "aside2", "aside3", "swap1", "swap2", "swap3"]

# Publishes a file, a folder and a summary that names the version of both: the summary is the entry point.
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from birefnet.publish import OutputSet

    root, version = Path(sys.argv[1]), sys.argv[2]
    targets = [root / "model.bin", root / "curves", root / "summary.json"]
    with OutputSet("demo", targets) as out:
        out.staged(targets[0]).write_text(version)
        out.staged(targets[1]).mkdir()
        (out.staged(targets[1]) / "a.csv").write_text(version)
        out.staged(targets[2]).write_text('{"version": "%s"}' % version)
""")


def _publish(root: Path, version: str, crash: str | None = None) -> int:
    env = {**os.environ}
    env.pop(CRASH_ENV, None)
    if crash:
        env[CRASH_ENV] = f"demo:{crash}"
    return subprocess.run([sys.executable, "-c", WRITER, str(root), version], env=env, timeout=60).returncode


def _versions(root: Path) -> dict[str, str | None]:
    model, curve, summary = root / "model.bin", root / "curves" / "a.csv", root / "summary.json"
    return {"model": model.read_text() if model.is_file() else None,
            "curves": curve.read_text() if curve.is_file() else None,
            "summary": json.loads(summary.read_text())["version"] if summary.is_file() else None}


@pytest.mark.parametrize("point", POINTS)
def test_killed_publication_never_mixes_old_and_new(tmp_path: Path, point: str) -> None:
    assert _publish(tmp_path, "old") == 0
    assert _versions(tmp_path) == {"model": "old", "curves": "old", "summary": "old"}
    assert _publish(tmp_path, "new", crash=point) == 137
    # as the crash left it: no output of one run beside an output of the other
    seen = {v for v in _versions(tmp_path).values() if v is not None}
    assert len(seen) <= 1, (point, _versions(tmp_path))
    if point == "staged":  # before the commit point: untouched, and no journal to finish
        assert _versions(tmp_path) == {"model": "old", "curves": "old", "summary": "old"}
        assert not journal_path(tmp_path, "demo").exists()
    else:  # committed: a reader finishes the publication and sees the whole new set
        assert journal_path(tmp_path, "demo").exists()
        finish_pending(tmp_path)
        assert _versions(tmp_path) == {"model": "new", "curves": "new", "summary": "new"}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["curves", "model.bin", "summary.json"]
    # the next run publishes over it cleanly (and removes an uncommitted run's temporaries)
    assert _publish(tmp_path, "third") == 0
    assert _versions(tmp_path) == {"model": "third", "curves": "third", "summary": "third"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves", "model.bin", "summary.json"]


def test_rerun_after_a_crash_finishes_it_before_staging(tmp_path: Path) -> None:
    assert _publish(tmp_path, "old") == 0
    assert _publish(tmp_path, "new", crash="swap1") == 137
    assert _versions(tmp_path) == {"model": "new", "curves": None, "summary": None}
    assert _publish(tmp_path, "third", crash="staged") == 137  # finished "new" on entry, then died before commit
    assert _versions(tmp_path) == {"model": "new", "curves": "new", "summary": "new"}


def test_exception_while_staging_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), OutputSet("demo", [target]) as out:
        out.staged(target).write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_unwritten_output_is_refused_and_nothing_published(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old")
    with pytest.raises(PublishError, match=str(b)), OutputSet("demo", [a, b]) as out:
        out.staged(a).write_text("new")
    assert a.read_text() == "old" and not b.exists() and not journal_path(tmp_path, "demo").exists()


def test_retract_removes_entry_point_first_and_leftovers(tmp_path: Path) -> None:
    targets = [tmp_path / "classes.json", tmp_path / "manifest.jsonl"]
    for t in targets:
        t.write_text("x")
    (tmp_path / ".manifest.jsonl.demo-new").write_text("half")
    removed = retract("demo", targets)
    assert removed == [targets[1], targets[0]] and list(tmp_path.iterdir()) == []
