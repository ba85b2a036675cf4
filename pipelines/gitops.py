"""Git steps of the ``retrain`` flow: start from the right commit, leave the result on a branch named after the run.

The deployment folder is a clone the flow owns. A run

1. fetches ``origin`` (when the clone has one) and resolves the *base*: the ``ref`` it was given, else the
   head of the base branch (``origin/<branch>`` when there is an origin, else the local branch the folder was
   on at its first retrain, remembered in ``git config birefnet.retrain.base``);
2. starts from the base, or from the previous retrain's commit when the base has not moved since (its
   ``dvc.lock`` already describes the outputs in the folder, so nothing reruns);
3. after ``dvc repro``, commits ``dvc.lock``, the metrics and every other file git does not ignore on
   ``retrain/<stamp>-<run id>`` and pushes that branch to ``origin``.

The folder never keeps uncommitted changes between runs; one that has some (a person edited it) stops the run
before anything is touched, naming the files.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipelines.common import CommandError

BASE_KEY = "birefnet.retrain.base"
LAST_KEY = "birefnet.retrain.last"
LAST_BASE_KEY = "birefnet.retrain.last-base"
REMOTE = "origin"
#: Used for the retrain commits when the clone has no identity of its own.
IDENTITY = ("birefnet retrain", "retrain@birefnet.invalid")
TRANSIENT = ("Could not resolve host", "Connection refused", "timed out", "Connection timed out",
             "unable to access", "early EOF", "The remote end hung up")


def git(root: Path, *args: str, check: bool = True, timeout_s: float = 600) -> str:
    """Run ``git args`` in ``root``; return stdout stripped.

    Raises:
        CommandError: git failed (transient when the message says the remote could not be reached).
    """
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        transient = any(marker in message for marker in TRANSIENT)
        raise CommandError(f"git {' '.join(args)} (in {root}) exited with {proc.returncode}: {message}",
                           transient=transient)
    return proc.stdout.strip()


def is_repository(root: Path) -> bool:
    """Whether ``root`` is the top of a git work tree with at least one commit."""
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.returncode == 0 and Path(proc.stdout.splitlines()[0]).resolve() == root.resolve()


def _config(root: Path, key: str) -> str | None:
    value = git(root, "config", "--get", key, check=False)
    return value or None


def has_origin(root: Path) -> bool:
    """Whether the clone has a remote named ``origin``."""
    return REMOTE in git(root, "remote").split()


def dirty_files(root: Path) -> list[str]:
    """Tracked files with uncommitted changes (untracked and ignored files do not count)."""
    out = git(root, "status", "--porcelain", "--untracked-files=no")
    return [line[3:] for line in out.splitlines() if line.strip()]


@dataclass(frozen=True)
class Start:
    """Where a retrain starts.

    Attributes:
        base: the ref the run follows (given, or the base branch's head) and its commit.
        base_commit: ``base`` resolved.
        commit: the commit checked out: ``base_commit``, or the previous retrain's commit on top of it.
        reused_previous: whether ``commit`` is the previous retrain's.
    """

    base: str
    base_commit: str
    commit: str
    reused_previous: bool


def _base_branch(root: Path) -> str:
    """The base branch: remembered from the first retrain, else the branch the folder is on now."""
    remembered = _config(root, BASE_KEY)
    if remembered:
        return remembered
    branch = git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    if not branch or branch.startswith("retrain/"):
        raise CommandError(f"{root}: cannot tell which branch to retrain (HEAD is {branch or 'detached'}); "
                           f"pass ref=... or set it with: git -C {root} config {BASE_KEY} main")
    git(root, "config", BASE_KEY, branch)
    return branch


def resolve_start(root: Path, ref: str | None) -> Start:
    """Fetch ``origin`` when there is one, resolve the base, and pick the commit to start from."""
    dirty = dirty_files(root)
    if dirty:
        raise CommandError(f"{root}: the deployment folder has uncommitted changes to tracked files "
                           f"({', '.join(dirty[:10])}); commit or discard them first")
    origin = has_origin(root)
    if origin:
        git(root, "fetch", "--prune", "--quiet", REMOTE)
    if ref is None:
        branch = _base_branch(root)
        remote_branch = f"{REMOTE}/{branch}"
        ref = remote_branch if origin and git(root, "rev-parse", "--verify", "--quiet", remote_branch,
                                              check=False) else branch
    base_commit = git(root, "rev-parse", "--verify", f"{ref}^{{commit}}")
    last, last_base = _config(root, LAST_KEY), _config(root, LAST_BASE_KEY)
    reuse = bool(last) and last_base == base_commit and git(root, "cat-file", "-t", last or "", check=False) == "commit"
    return Start(base=ref, base_commit=base_commit, commit=last if reuse and last else base_commit,
                 reused_previous=reuse)


def check_out(root: Path, start: Start) -> None:
    """Check out ``start.commit`` detached (the run's branch is created when there is something to commit)."""
    git(root, "checkout", "--quiet", "--detach", start.commit)


def _identity(root: Path) -> list[str]:
    if _config(root, "user.email"):
        return []
    return ["-c", f"user.name={IDENTITY[0]}", "-c", f"user.email={IDENTITY[1]}"]


@dataclass(frozen=True)
class Published:
    """The branch a retrain left.

    Attributes:
        branch: ``retrain/<stamp>-<run id>``.
        commit: the branch's commit (the start commit when the run changed nothing).
        files: files committed (empty when nothing changed).
        pushed: whether the branch was pushed to ``origin``.
    """

    branch: str
    commit: str
    files: list[str]
    pushed: bool


def commit_run(root: Path, start: Start, branch: str, message: str) -> Published:
    """Commit everything the run changed that git does not ignore on ``branch``; push it to ``origin``.

    Remembers the commit as the previous retrain of ``start.base_commit`` for the next run.
    """
    git(root, "checkout", "--quiet", "-B", branch)
    git(root, "add", "--all")
    files = git(root, "diff", "--cached", "--name-only").splitlines()
    if files:
        git(root, *_identity(root), "-c", "commit.gpgsign=false", "commit", "--quiet", "-m", message)
    commit = git(root, "rev-parse", "HEAD")
    git(root, "config", LAST_KEY, commit)
    git(root, "config", LAST_BASE_KEY, start.base_commit)
    pushed = False
    if has_origin(root):
        git(root, "push", "--quiet", REMOTE, f"{branch}:refs/heads/{branch}")
        pushed = True
    return Published(branch=branch, commit=commit, files=files, pushed=pushed)


def push_branch(root: Path, branch: str) -> bool:
    """Push an existing local ``branch`` to ``origin`` when there is one; return whether it was pushed."""
    if not has_origin(root):
        return False
    git(root, "push", "--quiet", REMOTE, f"{branch}:refs/heads/{branch}")
    return True


def file_at(root: Path, rev: str, path: str) -> str | None:
    """The text of ``path`` at ``rev``, or None when it is not there."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None
