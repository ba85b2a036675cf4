"""``birefnet ablate``: the ablation tables of the BiRefNet paper as DVC experiments, and their Markdown table.

Zheng et al., "Bilateral Reference for High-Resolution Dichotomous Image Segmentation", CAAI AIR 2024.
Each row of a table is a set of ``params.yaml`` overrides on top of the workspace's params. Every row runs as one
DVC experiment up to the ``evaluate`` stage (never ``register``): one after another with ``dvc exp run --temp``
(the default), or queued with ``dvc exp run --queue`` and run by ``dvc queue start``. Each experiment gets its own
absolute MLflow store, artifact folder and Ray storage path under the ablation's work folder, so nothing it writes
lands in the workspace's ``mlflow.db``, ``mlartifacts`` or ``checkpoints``. When every row has run, the rows'
``metrics/eval.json`` are read back from their experiment commits and written as a Markdown table with the
paper's DIS columns (means over ``data.test_sets``).

Table 1 ablates the components: the baseline decodes with vanilla residual blocks ("reconstruction block (RB) in
each BiRef block as a replacement for the vanilla residual blocks", Sec. 3.2), +RM swaps in the reconstruction
block, then the inward and outward references of the bilateral reference are added. Table 2 ablates the training
strategies on the full model: multi-stage supervision and region-level loss fine-tuning.

Usage::

    birefnet ablate --table 1 --dry-run
    birefnet ablate --table 1 --set loader.epoch_batches=40 --out docs/ablation-table1.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from birefnet.config import ParamsError, load_params, params_to_dict, parse_override
from birefnet.offline import merge_offline_env, offline_env
from birefnet.stages.common import EXIT_BAD_INPUT, EXIT_BAD_PARAMS

#: The pipeline stage every experiment runs up to (its upstream stages included; ``register`` never runs).
TARGET_STAGE = "evaluate"

#: Keys of ``offline.env`` whose relative values are paths in the repository.

#: The paper's DIS columns: (header, key in ``eval.json["mean"]``, higher is better).
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("maxF", "maxF", True),
    ("wF", "wF", True),
    ("MAE", "MAE", False),
    ("Sm", "Sm", True),
    ("meanE", "meanE", True),
    ("HCE", "HCE", False),
)


@dataclass(frozen=True)
class AblationRow:
    """One row of an ablation table.

    Attributes:
        slug: short name used in experiment names and folders (``[a-z0-9-]``).
        label: the row's name in the paper's table (``+RM +InRef``).
        overrides: ``key.path -> value`` applied on top of the params (values as YAML would load them).
        stages: optional transformation of the ``train.stages`` list (training-strategy rows).
    """

    slug: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    stages: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None


def _no_multistage_supervision(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every stage supervises the final map only (the side outputs stay: the outward reference needs them)."""
    return [{**stage, "supervise": "final"} for stage in stages]


def _region_finetune(stage: dict[str, Any]) -> bool:
    """A region-level loss fine-tuning stage: the pixel-level BCE is off (paper Sec. 3.4)."""
    return float((stage.get("loss") or {}).get("bce", 30.0)) == 0.0


def _no_region_finetune(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the region-level fine-tuning stages; their epochs go to the stage before, so the budget is equal."""
    kept: list[dict[str, Any]] = []
    carried = 0
    for stage in stages:
        if _region_finetune(stage):
            if kept:
                kept[-1] = {**kept[-1], "epochs": int(kept[-1]["epochs"]) + int(stage["epochs"])}
            else:
                carried += int(stage["epochs"])
            continue
        kept.append({**stage, "epochs": int(stage["epochs"]) + carried} if carried else stage)
        carried = 0
    if not kept:
        raise ParamsError("train.stages: every stage is a region-level fine-tuning stage (loss.bce 0); table 2 "
                          "needs at least one stage with the pixel-level loss")
    return kept


def _without_strategies(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _no_multistage_supervision(_no_region_finetune(stages))


_RM = {"model.decoder_block": "basic", "model.attention": "aspp_deformable"}
_FULL = {**_RM, "model.inward_reference": True, "model.outward_reference": True,
         "model.multistage_supervision": True}

#: table number -> (title, rows).
TABLES: dict[int, tuple[str, tuple[AblationRow, ...]]] = {
    1: ("Table 1: components (reconstruction module, inward and outward reference)", (
        AblationRow("baseline", "Baseline", {
            "model.decoder_block": "vanilla", "model.attention": "none",
            "model.inward_reference": False, "model.outward_reference": False}),
        AblationRow("rm", "+RM", {**_RM, "model.inward_reference": False, "model.outward_reference": False}),
        AblationRow("rm-inref", "+RM +InRef", {**_RM, "model.inward_reference": True,
                                               "model.outward_reference": False}),
        AblationRow("rm-outref", "+RM +OutRef", {**_RM, "model.inward_reference": False,
                                                 "model.outward_reference": True,
                                                 "model.multistage_supervision": True}),
        AblationRow("rm-inref-outref", "+RM +InRef +OutRef (BiRefNet)", dict(_FULL)),
    )),
    2: ("Table 2: training strategies (multi-stage supervision, region-level loss fine-tuning)", (
        AblationRow("no-strategies", "BiRefNet w/o strategies", dict(_FULL), _without_strategies),
        AblationRow("mss", "+MSS", dict(_FULL), _no_region_finetune),
        AblationRow("mss-rlft", "+MSS +RLFT", dict(_FULL), None),
    )),
}


@dataclass
class PlannedRow:
    """A row resolved against the params: its experiment name, folder and every ``-S`` override."""

    row: AblationRow
    experiment: str
    folder: Path
    overrides: dict[str, Any]
    metrics_path: str


@dataclass
class RowResult:
    """What one experiment gave: its mean metrics, or why there are none."""

    planned: PlannedRow
    metrics: dict[str, Any] | None = None
    seconds: float | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------------------ overrides


def yaml_flow(value: Any) -> str:
    """``value`` as one line of YAML (the form ``--set`` and :func:`birefnet.config.parse_override` read)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").strip()


def hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, the form ``dvc exp run -S key=value`` reads.

    Strings are always quoted, so ``none`` or ``1e-4`` stay strings and paths keep their colons and slashes.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
                raise ParamsError(f"cannot pass the mapping key {key!r} to dvc exp run -S (expected an identifier)")
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    raise ParamsError(f"cannot pass a {type(value).__name__} value to dvc exp run -S: {value!r}")


def _parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """``--set KEY.PATH=VALUE`` strings as ``{dotted key: value}``, parsed like every params override."""
    return {".".join(path): value for path, value in map(parse_override, sets)}


def isolation_overrides(folder: Path) -> dict[str, Any]:
    """Where one experiment writes outside the DVC pipeline: absolute, inside ``folder``."""
    folder = folder.resolve()
    return {
        "tracking.uri": f"sqlite:///{folder / 'mlflow.db'}",
        "tracking.artifact_location": str(folder / "mlartifacts"),
        "train.storage_path": str(folder / "checkpoints"),
    }


def plan_rows(table: int, params_path: Path, sets: Sequence[str], work: Path, stamp: str,
              only: Sequence[str] = ()) -> list[PlannedRow]:
    """Resolve every row of ``table``: overrides (``--set`` first, then the row, then isolation), validated.

    Raises:
        ParamsError: an override is malformed, or a row's params do not validate (the message names the row).
    """
    if table not in TABLES:
        raise ParamsError(f"--table: expected one of {sorted(TABLES)}, given {table}")
    rows = TABLES[table][1]
    unknown = [name for name in only if name not in {r.slug for r in rows}]
    if unknown:
        raise ParamsError(f"--rows: unknown row(s) {unknown}; table {table} has {[r.slug for r in rows]}")
    common = _parse_sets(sets)
    for key in (*isolation_overrides(work), "train.run_name"):
        if key in common:
            raise ParamsError(f"--set {key}: set per experiment by the ablation (isolated under {work}); drop it")
    planned: list[PlannedRow] = []
    for row in rows:
        if only and row.slug not in only:
            continue
        folder = work / row.slug
        overrides = {**common, **row.overrides}
        if row.stages is not None:
            base = load_params(params_path, [f"{k}={yaml_flow(v)}" for k, v in overrides.items()])
            overrides["train.stages"] = row.stages(params_to_dict(base.train)["stages"])
        overrides.update(isolation_overrides(folder))
        try:
            params = load_params(params_path, [f"{k}={yaml_flow(v)}" for k, v in overrides.items()])
        except ParamsError as exc:
            raise ParamsError(f"table {table} row {row.label!r}: {exc}") from None
        planned.append(PlannedRow(row=row, experiment=f"t{table}-{row.slug}-{stamp}", folder=folder,
                                  overrides=overrides, metrics_path=params.evaluate.out.as_posix()))
    return planned


def dvc_set_args(overrides: dict[str, Any]) -> list[str]:
    """The ``-S key=value`` arguments of ``dvc exp run`` for ``overrides``."""
    args: list[str] = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={hydra_value(value)}"]
    return args


# ------------------------------------------------------------------------------------------------ running


def _repo_root(start: Path) -> Path:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=start, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FileNotFoundError(f"{start}: not inside a git repository (DVC experiments need one): "
                                f"{proc.stderr.strip()}")
    root = Path(proc.stdout.strip())
    if not (root / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{root}: no dvc.yaml at the repository root")
    head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        raise FileNotFoundError(f"{root}: the git repository has no commit yet; DVC experiments start from HEAD")
    return root


def experiment_env(root: Path) -> dict[str, str]:
    """Environment for ``dvc``: the repository's offline switches, its own code first, no tracking override.

    * ``offline.env`` (telemetry off, loopback) fills keys the environment does not set.
    * The repository root goes first on ``PYTHONPATH``: the stages then import this checkout's ``birefnet`` even
      where an editable install points at another checkout.
    * ``MLFLOW_TRACKING_URI`` is dropped: it would override every experiment's own ``tracking.uri``.
    """
    env = dict(os.environ)
    merge_offline_env(env, offline_env(root))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(root), *(p for p in paths if p != str(root))])
    env.pop("MLFLOW_TRACKING_URI", None)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def _dvc() -> str:
    found = shutil.which("dvc", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        raise FileNotFoundError("dvc: command not found (install the project's dependencies)")
    return found


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> int:
    """Run ``cmd`` with stdout+stderr appended to ``log_path``; the stage names it starts are echoed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            match = re.match(r"(Running stage '[^']+'|Stage '[^']+' is cached|Stage '[^']+' didn't change)", line)
            if match:
                print(f"      {datetime.now():%H:%M:%S} {match.group(1)}", flush=True)
        return proc.wait()


def experiment_ref(root: Path, name: str) -> str | None:
    """The newest ``refs/exps/...`` ref whose last component is ``name``, or None."""
    proc = subprocess.run(["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"],
                          cwd=root, capture_output=True, text=True, check=True)
    for ref in proc.stdout.split():
        # refs/exps/<baseline>/<name> are finished experiments; DVC's own queue bookkeeping lives beside them
        if ref.rsplit("/", 1)[-1] == name and not ref.startswith(("refs/exps/celery/", "refs/exps/temp/")):
            return ref
    return None


def read_experiment_metrics(root: Path, name: str, metrics_path: str) -> dict[str, Any]:
    """``eval.json`` as committed by experiment ``name``.

    Raises:
        FileNotFoundError: no such experiment, or its commit has no metrics file.
        ValueError: the file is not JSON with a ``mean`` mapping.
    """
    ref = experiment_ref(root, name)
    if ref is None:
        raise FileNotFoundError(f"experiment {name!r}: no refs/exps entry (did the run fail?)")
    proc = subprocess.run(["git", "show", f"{ref}:{metrics_path}"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FileNotFoundError(f"experiment {name!r} ({ref}): no {metrics_path} in its commit")
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise ValueError(f"experiment {name!r}: {metrics_path} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("mean"), dict):
        raise ValueError(f"experiment {name!r}: {metrics_path} has no 'mean' mapping (keys: "
                         f"{sorted(doc) if isinstance(doc, dict) else type(doc).__name__})")
    return doc


def run_temp(root: Path, planned: list[PlannedRow], env: dict[str, str]) -> list[RowResult]:
    """Run the rows one after another, each with ``dvc exp run --temp`` (a private copy of the workspace)."""
    results = []
    for index, item in enumerate(planned, 1):
        item.folder.mkdir(parents=True, exist_ok=True)
        log = item.folder / "dvc.log"
        print(f"[{index}/{len(planned)}] {item.row.label}: dvc exp run --temp -n {item.experiment} "
              f"(log {log})", flush=True)
        start = time.perf_counter()
        code = _run_logged([_dvc(), "exp", "run", "--temp", "-n", item.experiment, *dvc_set_args(item.overrides),
                            TARGET_STAGE], root, env, log)
        seconds = time.perf_counter() - start
        results.append(_collect(root, item, seconds, code, log))
    return results


def run_queue(root: Path, planned: list[PlannedRow], env: dict[str, str], jobs: int,
              poll_s: float = 10.0) -> list[RowResult]:
    """Queue every row (``dvc exp run --queue``), start ``jobs`` workers, wait for all of them, collect."""
    for item in planned:
        item.folder.mkdir(parents=True, exist_ok=True)
        log = item.folder / "dvc.log"
        code = _run_logged([_dvc(), "exp", "run", "--queue", "-n", item.experiment, *dvc_set_args(item.overrides),
                            TARGET_STAGE], root, env, log)
        if code != 0:
            raise RuntimeError(f"dvc exp run --queue for {item.experiment} exited {code} (log {log})")
        print(f"queued {item.row.label} as {item.experiment}", flush=True)
    start = time.perf_counter()
    subprocess.run([_dvc(), "queue", "start", "-j", str(jobs)], cwd=root, env=env, check=True)
    states: dict[str, str] = {}
    last = ""
    while True:
        status = subprocess.run([_dvc(), "queue", "status"], cwd=root, env=env, capture_output=True, text=True)
        states = queue_states(status.stdout, [item.experiment for item in planned])
        summary = ", ".join(f"{item.row.slug} {states.get(item.experiment, '?')}" for item in planned)
        if summary != last:
            print(f"      {datetime.now():%H:%M:%S} {summary}", flush=True)
            last = summary
        if not any(state in ("Queued", "Running", "?") for state in states.values()) and len(states) == len(planned):
            break
        time.sleep(poll_s)
    seconds = time.perf_counter() - start
    results = []
    for item in planned:
        logs = subprocess.run([_dvc(), "queue", "logs", item.experiment], cwd=root, env=env, capture_output=True,
                              text=True)
        with (item.folder / "dvc.log").open("a", encoding="utf-8") as log:
            log.write(logs.stdout + logs.stderr)
        code = 0 if states.get(item.experiment) == "Success" else 1
        results.append(_collect(root, item, None, code, item.folder / "dvc.log"))
    print(f"queue finished in {seconds / 60:.1f} min", flush=True)
    return results


def queue_states(status_text: str, names: Sequence[str]) -> dict[str, str]:
    """``name -> Queued | Running | Success | Failed | ...`` from the output of ``dvc queue status``."""
    states: dict[str, str] = {}
    for line in status_text.splitlines():
        words = line.split()
        for name in names:
            if name in words and words:
                states[name] = words[-1]
    return states


def _collect(root: Path, item: PlannedRow, seconds: float | None, code: int, log: Path) -> RowResult:
    minutes = f" in {seconds / 60:.1f} min" if seconds is not None else ""
    if code != 0:
        print(f"      FAILED{minutes}: dvc exited {code}; see {log}", flush=True)
        return RowResult(item, seconds=seconds, error=f"dvc exited {code} (log {log})")
    try:
        doc = read_experiment_metrics(root, item.experiment, item.metrics_path)
    except (FileNotFoundError, ValueError) as exc:
        print(f"      FAILED{minutes}: {exc}", flush=True)
        return RowResult(item, seconds=seconds, error=str(exc))
    (item.folder / "eval.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    mean = doc["mean"]
    shown = ", ".join(f"{header} {_fmt(mean.get(key), key)}" for header, key, _ in COLUMNS)
    print(f"      done{minutes}: {shown}", flush=True)
    return RowResult(item, metrics=mean, seconds=seconds)


# ------------------------------------------------------------------------------------------------ table


def _fmt(value: Any, key: str) -> str:
    if not isinstance(value, int | float):
        return "n/a"
    return f"{value:.0f}" if key == "HCE" else f"{value:.3f}"


def markdown_table(table: int, results: Sequence[RowResult]) -> str:
    """The paper's columns, one row per experiment, the best value of each column in bold."""
    arrows = {True: "↑", False: "↓"}
    header = "| Row | " + " | ".join(f"{h} {arrows[up]}" for h, _, up in COLUMNS) + " | Experiment |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    best: dict[str, float] = {}
    for _, key, up in COLUMNS:
        values = [r.metrics[key] for r in results if r.metrics and isinstance(r.metrics.get(key), int | float)]
        if values:
            best[key] = max(values) if up else min(values)
    for result in results:
        cells = []
        for _, key, _ in COLUMNS:
            value = result.metrics.get(key) if result.metrics else None
            text = _fmt(value, key) if result.metrics else "failed"
            if key in best and isinstance(value, int | float) and _fmt(value, key) == _fmt(best[key], key):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {result.planned.row.label} | " + " | ".join(cells) + f" | `{result.planned.experiment}` |")
    return "\n".join(lines) + "\n"


def _describe(table: int, planned: Sequence[PlannedRow]) -> str:
    title = TABLES[table][0]
    out = [f"{title}: {len(planned)} row(s), each `dvc exp run ... {TARGET_STAGE}`"]
    for item in planned:
        out.append(f"\n{item.row.label}  (experiment {item.experiment})")
        for key, value in item.overrides.items():
            out.append(f"  -S {key}={hydra_value(value)}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ CLI


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``birefnet ablate``."""
    parser = argparse.ArgumentParser(
        prog="birefnet ablate",
        description="Run the rows of one of the paper's ablation tables as DVC experiments (up to the evaluate "
                    "stage; nothing is registered) and write the Markdown table of their test metrics.")
    parser.add_argument("--table", type=int, required=True, choices=sorted(TABLES),
                        help="1: components (baseline, +RM, +InRef, +OutRef); 2: training strategies")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a parameter in every row (repeatable), e.g. a short schedule: "
                             "--set loader.epoch_batches=40 --set 'train.stages=[{name: main, epochs: 2}]'")
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all); see --dry-run")
    parser.add_argument("--mode", choices=("temp", "queue"), default="temp",
                        help="temp: dvc exp run --temp, one row after another (default); queue: dvc exp run "
                             "--queue, then dvc queue start")
    parser.add_argument("--jobs", type=int, default=1, help="queue workers (--mode queue; default: %(default)s)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the experiments' MLflow stores, checkpoints and logs (default: "
                             ".dvc/tmp/ablate/table<N>-<time> in the repository)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here too")
    parser.add_argument("--dry-run", action="store_true", help="print the rows and their -S overrides; run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``birefnet ablate``; 0 when every row produced metrics, 1 when one failed, 2 bad params, 3 bad input."""
    args = get_args_parser().parse_args(argv)
    try:
        root = _repo_root(Path.cwd())
    except FileNotFoundError as exc:
        print(f"error: ablate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # ``dvc exp run -S`` edits the repository's params.yaml inside each experiment: that file is the start point.
    params_path = root / "params.yaml"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    work = (args.work or root / ".dvc" / "tmp" / "ablate" / f"table{args.table}-{stamp}").resolve()
    only = [name.strip() for name in args.rows.split(",") if name.strip()]
    try:
        planned = plan_rows(args.table, params_path, args.overrides, work, stamp, only)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    print(_describe(args.table, planned), flush=True)
    if args.dry_run:
        return 0
    print(f"\nwork folder: {work}", flush=True)
    env = experiment_env(root)
    start = time.perf_counter()
    try:
        if args.mode == "temp":
            results = run_temp(root, planned, env)
        else:
            results = run_queue(root, planned, env, args.jobs)
    except (FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"error: ablate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    minutes = (time.perf_counter() - start) / 60
    table = markdown_table(args.table, results)
    print(f"\n{TABLES[args.table][0]} ({minutes:.1f} min)\n\n{table}", flush=True)
    (work / f"table{args.table}.md").write_text(table, encoding="utf-8")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
        print(f"wrote {args.out}", flush=True)
    return 1 if any(r.metrics is None for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
