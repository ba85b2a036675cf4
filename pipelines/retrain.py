"""The ``retrain`` flow: the whole pipeline from params, exactly as a manual ``dvc repro`` runs it, on the
latest commit and data, with the result committed to a branch named after the run.

Steps, each a task:

1. ``git-start`` (when the folder is a git clone, see :mod:`pipelines.gitops`): fetch ``origin``, resolve the
   base (the ``ref`` parameter, else the head of the base branch) and check it out, or the previous
   retrain's commit when the base has not moved since. A new commit, or a new data version (a changed
   ``.dvc`` file or ``dvc.lock`` in it), therefore reaches the run.
2. ``validate-params``: load ``params.yaml`` with the overrides through :func:`birefnet.config.load_params`
   (no retry: bad params fail the run at once, before DVC touches anything).
3. ``dvc-pull``: when the repository has a reachable default DVC remote, pull what it holds (and its run
   cache) so unchanged stages are not recomputed; a network failure is retried, any failure ends in a
   warning (``dvc repro`` recomputes what is missing).
4. ``dvc-repro``: ``dvc repro``; with overrides ``dvc exp run --temp -S key=value ...`` instead: DVC runs the
   experiment in a temporary copy, so ``params.yaml`` in the deployment folder is never modified, and records
   it (``dvc exp show`` lists it). The stages' MLflow store is the deployment's own, by absolute URI
   (``MLFLOW_TRACKING_URI``; a relative ``sqlite:///mlflow.db`` would otherwise land in the temporary copy).
   A stage that exits with 2 (bad params) or 3 (bad input) fails the run with its error message and no retry;
   a busy DVC lock, a network error or a timeout is retried with backoff (DVC skips the stages already done).
5. ``dvc-push``: push the outputs and the run cache to the DVC remote.
6. ``git-publish``: commit ``dvc.lock``, metrics and the registry record on ``retrain/<stamp>-<run id>``
   (for an experiment: ``dvc exp branch``) and push the branch to ``origin``.
7. ``report``: the registered model version and the gate decision from ``registry/registered.json`` (written
   by the ``register`` stage), the branch, the stages and output hashes of ``dvc.lock``; also a Markdown
   artifact shown on the flow run's page in the Prefect UI.

One retrain at a time per workspace: the flow holds an exclusive lock on ``.dvc/tmp/retrain.lock`` for the
whole run, and a second run waits for it (up to ``lock_timeout_s``); the deployment adds
``concurrency_limit: 1`` so the server queues a second scheduled run instead of starting it (prefect.yaml).

Run it once from the shell: ``python -m pipelines.retrain [KEY.PATH=VALUE ...] [--set KEY.PATH=VALUE ...]``
(``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.runtime import flow_run

from birefnet.config import ParamsError, load_params, parse_override
from pipelines import gitops
from pipelines.common import RETRY_POLICY, CommandError, working_directory, workspace_lock

LOCK_PATH = Path(".dvc/tmp/retrain.lock")
#: Defaults of the flow (and of ``python -m pipelines.retrain``): wait for another retrain, and for dvc repro.
LOCK_TIMEOUT_S = 6 * 3600.0
REPRO_TIMEOUT_S = 12 * 3600.0
REGISTERED = Path("registry/registered.json")
# Exit codes of the stage commands (birefnet.stages.common) as DVC reports them.
PERMANENT_EXITS = {2: "bad params", 3: "bad input"}
# Output of a failed dvc command that means "try again later".
TRANSIENT_MARKERS = ("Unable to acquire lock", "is busy", "ConnectionError", "ConnectionRefusedError",
                     "Connection refused", "TimeoutError", "timed out", "Max retries exceeded", "API request to",
                     "Temporary failure in name resolution", "GetTimeoutError", "BrokenPipeError")
TAIL_LINES = 200


def _dvc() -> str:
    """The ``dvc`` of this interpreter's environment (a worker's PATH may not include the venv)."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.is_file() else (shutil.which("dvc") or "dvc")


def _env() -> dict[str, str]:
    """The environment for dvc: the venv's scripts (``birefnet``) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


def absolute_tracking_uri(uri: str, root: Path) -> str:
    """``uri`` with a relative SQLite file or store folder made absolute against ``root``; others unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((root / uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri and not os.path.isabs(uri):
        return str((root / uri).resolve())
    return uri


def run_command(args: list[str], timeout_s: float, log_prefix: str = "",
                keep: str = "Running stage '", env: dict[str, str] | None = None) -> tuple[int, str, list[str]]:
    """Run ``args`` in its own process group, stream its output to the run logger.

    Returns:
        The exit code, the last lines of output, and every line that starts with ``keep``.

    On a timeout, or when the flow itself is interrupted or cancelled, the whole group (dvc and the stage
    command it started) is killed, so nothing keeps running detached and DVC's lock is released.

    Raises:
        CommandError: the command timed out (transient).
    """
    logger = get_run_logger()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    kept: list[str] = []
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env or _env(), start_new_session=True)
    timed_out = threading.Event()

    def _kill() -> None:
        timed_out.set()
        _kill_group(proc)

    timer = threading.Timer(timeout_s, _kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                if line.startswith(keep):
                    kept.append(line)
                logger.info("%s%s", log_prefix, line)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _kill_group(proc)
    if timed_out.is_set():
        raise CommandError(f"{' '.join(args)} timed out after {timeout_s:.0f} s", transient=True)
    return code, "\n".join(tail), kept


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def classify_failure(args: list[str], code: int, output: str) -> CommandError:
    """Turn a failed dvc command into a :class:`CommandError` that says whether a retry may help."""
    command = " ".join(Path(args[0]).name if i == 0 else a for i, a in enumerate(args))
    # judge the failing stage only: earlier stages may have logged harmless warnings (Ray teardown timeouts)
    output = "Running stage" + output.rsplit("Running stage", 1)[-1] if "Running stage" in output else output
    for exit_code, meaning in PERMANENT_EXITS.items():
        if f"exited with {exit_code}" in output:
            lines = output.splitlines()
            # the stage's own message ("error: <stage>: ...", possibly several lines) and DVC's summary after it
            first = next((i for i, ln in enumerate(lines) if ln.startswith(("error:", "ERROR:"))), 0)
            detail = "\n".join(lines[first:])
            return CommandError(f"{command} failed ({meaning}, not retried):\n{detail}", transient=False)
    transient = any(marker in output for marker in TRANSIENT_MARKERS)
    kind = "transient, retried" if transient else "not retried"
    return CommandError(f"{command} exited with {code} ({kind}):\n{output}", transient=transient)


@task(name="git-start", cache_policy=NO_CACHE, **RETRY_POLICY)
def git_start(ref: str | None) -> dict[str, Any]:
    """Fetch, resolve the base and check out the commit the run starts from (see :mod:`pipelines.gitops`)."""
    root = Path.cwd()
    start = gitops.resolve_start(root, ref)
    gitops.check_out(root, start)
    get_run_logger().info("retrain starts from %s (%s%s)", start.commit[:12], start.base,
                          ", the previous retrain of it" if start.reused_previous else "")
    return {"base": start.base, "base_commit": start.base_commit, "commit": start.commit,
            "reused_previous": start.reused_previous}


@task(name="validate-params", cache_policy=NO_CACHE)
def validate_params(overrides: list[str]) -> dict[str, Any]:
    """Validate ``params.yaml`` with ``overrides`` before DVC starts (no retry); return the tracking target."""
    params = load_params("params.yaml", overrides)
    register = getattr(params, "register", None)
    return {"train_out": str(params.train.out), "registered": str(register.out if register else REGISTERED),
            "tracking_uri": absolute_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri,
                                                  Path.cwd())}


def reachable_remote() -> str | None:
    """The default DVC remote's name when one is configured and reachable, else None.

    A local-path remote is reachable when its folder exists; a cloud remote (``s3://`` ...) is assumed reachable
    here, and a network failure during ``dvc pull`` is retried as a transient fault.
    """
    # `dvc config -l` prints one KEY=VALUE per line whatever the width (`dvc remote list` wraps long lines)
    proc = subprocess.run([_dvc(), "config", "-l"], capture_output=True, text=True, env=_env(), timeout=60)
    if proc.returncode != 0:
        return None
    config = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    name = config.get("core.remote", "").strip()
    if not name or f"remote.{name}.url" not in config:
        return None
    url = config[f"remote.{name}.url"].strip()
    if "://" in url and not url.startswith("file://"):
        return name
    local = Path(url.removeprefix("file://"))
    # DVC resolves a relative path against the folder of the config file that set it (.dvc/)
    return name if (local if local.is_absolute() else Path(".dvc") / local).is_dir() else None


@task(name="dvc-pull", cache_policy=NO_CACHE, **RETRY_POLICY)
def pull_data(timeout_s: float) -> str:
    """``dvc pull`` (outputs and run cache) from the default remote; retried only when it failed to reach it."""
    args = [_dvc(), "pull", "--allow-missing", "--run-cache"]
    code, output, _ = run_command(args, timeout_s, log_prefix="dvc pull | ")
    if code != 0:
        raise classify_failure(args, code, output)
    return output.splitlines()[-1] if output else "nothing to pull"


@task(name="dvc-repro", cache_policy=NO_CACHE, **RETRY_POLICY)
def reproduce(overrides: list[str], timeout_s: float, tracking_uri: str, experiment: str | None = None
              ) -> dict[str, Any]:
    """``dvc repro``, or ``dvc exp run --temp --name EXPERIMENT -S ...`` with overrides; return the stages run.

    The stages get ``MLFLOW_TRACKING_URI=tracking_uri`` (absolute): an experiment runs in a temporary copy of
    the folder, and its runs and model versions belong in the deployment's store.
    """
    args = [_dvc(), "repro"]
    if overrides:
        args = [_dvc(), "exp", "run", "--temp", *(["--name", experiment] if experiment else []),
                *(a for o in overrides for a in ("-S", o))]
    start = time.perf_counter()
    code, output, stage_lines = run_command(args, timeout_s, log_prefix="dvc | ",
                                            env=dict(_env(), MLFLOW_TRACKING_URI=tracking_uri))
    if code != 0:
        raise classify_failure(args, code, output)
    ran = [line.split("'")[1] for line in stage_lines]
    seconds = round(time.perf_counter() - start, 1)
    return {"command": " ".join(["dvc", *args[1:]]), "stages_run": ran, "seconds": seconds}


@task(name="dvc-push", cache_policy=NO_CACHE, **RETRY_POLICY)
def push_data(timeout_s: float) -> str:
    """``dvc push`` of the outputs and the run cache to the default remote (retried when it is unreachable)."""
    args = [_dvc(), "push", "--run-cache"]
    code, output, _ = run_command(args, timeout_s, log_prefix="dvc push | ")
    if code != 0:
        raise classify_failure(args, code, output)
    return output.splitlines()[-1] if output else "nothing to push"


@task(name="git-publish", cache_policy=NO_CACHE, **RETRY_POLICY)
def publish(start: dict[str, Any], branch: str, experiment: str | None, message: str) -> dict[str, Any]:
    """Commit the run's results on ``branch`` (an experiment: ``dvc exp branch``) and push it to ``origin``."""
    root = Path.cwd()
    if experiment is None:
        done = gitops.commit_run(root, gitops.Start(**start), branch, message)
        result = {"branch": done.branch, "commit": done.commit, "files": done.files, "pushed": done.pushed}
    else:
        proc = subprocess.run([_dvc(), "exp", "branch", experiment, branch], capture_output=True, text=True,
                              env=_env(), timeout=600)
        if proc.returncode != 0:
            raise CommandError(f"dvc exp branch {experiment} {branch}: {proc.stderr.strip()}")
        commit = gitops.git(root, "rev-parse", branch)
        files = gitops.git(root, "diff", "--name-only", start["commit"], commit).splitlines()
        result = {"branch": branch, "commit": commit, "files": files, "pushed": gitops.push_branch(root, branch)}
    get_run_logger().info("retrain results on branch %s at %s (%d files changed%s)", branch, result["commit"][:12],
                          len(result["files"]), ", pushed to origin" if result["pushed"] else "")
    return result


def _lock_summary(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    doc = yaml.safe_load(text) or {}
    outs: dict[str, str] = {}
    for stage in doc.get("stages", {}).values():
        for out in stage.get("outs", []) or []:
            outs[out["path"]] = out.get("md5") or out.get("hash") or ""
    return {"stages": sorted(doc.get("stages", {})), "outs": outs}


def _read_result(path: str, git_result: dict[str, Any] | None) -> str | None:
    """A result file's text: from the run's branch when there is one (an experiment ran elsewhere), else the folder."""
    if git_result is not None:
        return gitops.file_at(Path.cwd(), git_result["commit"], path)
    file = Path(path)
    return file.read_text(encoding="utf-8") if file.is_file() else None


@task(name="report", cache_policy=NO_CACHE)
def report(repro: dict[str, Any], train_out: str, registered_path: str,
           git_result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collect what the run left: registered version and gate decision, dvc.lock outputs, branch, the model file."""
    record = _read_result(registered_path, git_result)
    registered = json.loads(record) if record else None
    lock_text = _read_result("dvc.lock", git_result)
    model = Path(train_out) / "model.safetensors"
    result: dict[str, Any] = {
        **repro,
        "dvc_lock": _lock_summary(lock_text),
        "dvc_lock_sha256": hashlib.sha256(lock_text.encode()).hexdigest() if lock_text else None,
        "git": git_result,
        "model": str(model) if model.is_file() else None,
        "registered": registered,
        "version": (registered or {}).get("version"),
        "gate": _gate(registered),
    }
    lines = ["# Retrain", "", f"- command: `{repro['command']}`",
             f"- stages run: {', '.join(repro['stages_run']) or 'none (up to date)'}",
             f"- seconds: {repro['seconds']}"]
    if git_result is not None:
        lines += [f"- branch: `{git_result['branch']}` at `{git_result['commit'][:12]}`"
                  f"{' (pushed to origin)' if git_result['pushed'] else ''}",
                  f"- dvc.lock sha256: `{result['dvc_lock_sha256']}`"]
    if registered is None:
        lines.append(f"- registry: `{registered_path}` not written (no register stage in dvc.yaml)")
    else:
        lines += [f"- registered version: **{result['version']}**", f"- gate: **{result['gate']}**", "",
                  "```json", json.dumps(registered, indent=1), "```"]
    lines += ["", "| output | hash |", "|---|---|"]
    lines += [f"| `{path}` | `{digest}` |" for path, digest in result["dvc_lock"].get("outs", {}).items()]
    create_markdown_artifact("\n".join(lines), key="retrain-report", description="Result of the retrain flow")
    get_run_logger().info("retrain: version=%s gate=%s stages_run=%s", result["version"], result["gate"],
                          repro["stages_run"])
    return result


def _gate(registered: dict[str, Any] | None) -> str | None:
    """The gate decision of a ``registered.json`` record (``promoted``, ``first``, ``kept`` ...)."""
    gate = (registered or {}).get("gate")
    if isinstance(gate, dict):
        return str(gate.get("decision")) if gate.get("decision") is not None else None
    return None if gate is None else str(gate)


def _run_name() -> str:
    overrides = flow_run.parameters.get("overrides") or []
    return "retrain" + (f" {' '.join(overrides)}" if overrides else "")


@flow(name="retrain", flow_run_name=_run_name, validate_parameters=True)
def retrain(overrides: list[str] | None = None, workdir: str | None = None, pull: bool = True,
            lock_timeout_s: float = LOCK_TIMEOUT_S, repro_timeout_s: float = REPRO_TIMEOUT_S,
            ref: str | None = None, use_git: bool = True) -> dict[str, Any]:
    """Run the whole pipeline from ``params.yaml`` in ``workdir`` and report the registered model.

    Args:
        overrides: ``key.path=value`` strings, as ``dvc exp run -S`` takes them; empty runs ``dvc repro``.
        workdir: the DVC repository (default: the current directory, i.e. the deployment's folder).
        pull: pull from the DVC remote first (and push after) when one is configured.
        lock_timeout_s: how long to wait for another retrain in the same workspace before failing.
        repro_timeout_s: kill ``dvc repro`` after this many seconds (then retried as a timeout).
        ref: the git ref to retrain (default: the head of the base branch, fetched from origin).
        use_git: in a git clone, start from ``ref`` and commit the results on a ``retrain/...`` branch.

    Returns:
        The report: command, stages run, seconds, dvc.lock outputs and hash, branch, model path, registered
        version and gate.
    """
    logger = get_run_logger()
    overrides = list(overrides or [])
    run_id = str(get_run_context().flow_run.id)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    slug = f"{stamp}-{run_id[:8]}"
    with working_directory(workdir) as root:
        def waiting(holder: str) -> None:
            logger.info("another retrain holds %s (%s): waiting", root / LOCK_PATH, holder)

        with workspace_lock(LOCK_PATH, lock_timeout_s, owner={"flow_run_id": run_id}, on_wait=waiting):
            in_git = use_git and gitops.is_repository(root)
            start = git_start(ref) if in_git else None
            if not in_git:
                logger.info("%s is not a git clone (or use_git is off): results stay in the folder", root)
            target = validate_params(overrides)
            remote = reachable_remote() if pull else None
            if remote is not None:
                state = pull_data(timeout_s=min(repro_timeout_s, 3600.0), return_state=True)
                if not state.is_completed():
                    logger.warning("dvc pull from %s failed (%s): dvc repro recomputes what is missing", remote,
                                   state.message)
            elif pull:
                logger.info("no reachable DVC remote: skipping dvc pull")
            experiment = f"retrain-{slug}" if overrides else None
            repro = reproduce(overrides, repro_timeout_s, target["tracking_uri"], experiment)
            if remote is not None:
                push_data(timeout_s=min(repro_timeout_s, 3600.0))
            git_result = None
            if start is not None:
                message = f"retrain {slug}: {repro['command']} (flow run {run_id})"
                git_result = publish(start, f"retrain/{slug}", experiment, message)
            return report(repro, target["train_out"], target["registered"], git_result)


def _override(text: str) -> str:
    """An argparse ``type``: ``text`` when it is a ``key.path=value`` override, else a usage error."""
    try:
        parse_override(text)
    except ParamsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def get_args_parser() -> argparse.ArgumentParser:
    """Parser for ``python -m pipelines.retrain``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.retrain",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the retrain flow once, in this process: in a git clone, fetch origin and check out the\n"
                    "base branch's head; validate params.yaml with the overrides; dvc pull when a DVC remote is\n"
                    "reachable, then dvc repro (with overrides: dvc exp run --temp -S KEY=VALUE ..., recorded as\n"
                    "a DVC experiment, params.yaml untouched); dvc push; commit dvc.lock and the metrics on\n"
                    "branch retrain/<stamp>-<run> and push it; report the registered model version and the\n"
                    "promotion gate's decision. Exit code 0 when the flow run completes, 1 when it fails.",
        epilog="examples:\n"
               "  python -m pipelines.retrain                      # dvc repro\n"
               "  python -m pipelines.retrain train.lr=0.0005      # dvc exp run -S train.lr=0.0005\n"
               "  python -m pipelines.retrain --set train.lr=0.0005 --set data.size=[512,512]")
    parser.add_argument("overrides", nargs="*", type=_override, metavar="KEY.PATH=VALUE",
                        help="parameter overrides, as dvc exp run -S takes them (none: plain dvc repro)")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], type=_override,
                        metavar="KEY.PATH=VALUE",
                        help="one parameter override (repeatable); same as a positional override, applied after them")
    parser.add_argument("--workdir", default=None,
                        help="the DVC repository to run in (default: the current directory)")
    parser.add_argument("--no-pull", dest="pull", action="store_false",
                        help="skip dvc pull and push even when a DVC remote is configured")
    parser.add_argument("--ref", default=None,
                        help="git ref to retrain (default: the head of the base branch, fetched from origin)")
    parser.add_argument("--no-git", dest="use_git", action="store_false",
                        help="do not check out a ref nor commit the results on a retrain/... branch")
    parser.add_argument("--lock-timeout-s", type=float, default=LOCK_TIMEOUT_S,
                        help="seconds to wait for another retrain in the same workspace (default: %(default)s)")
    parser.add_argument("--repro-timeout-s", type=float, default=REPRO_TIMEOUT_S,
                        help="kill dvc repro after this many seconds; retried as a timeout (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the flow; returns 0 when the flow run completed, else 1."""
    args = get_args_parser().parse_args(argv)
    state = retrain(overrides=[*args.overrides, *args.set_overrides], workdir=args.workdir, pull=args.pull,
                    lock_timeout_s=args.lock_timeout_s, repro_timeout_s=args.repro_timeout_s, ref=args.ref,
                    use_git=args.use_git, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
