"""Every file under infra/ (and prefect.yaml) parses, has its required keys, pins its images, holds no secret,
and publishes only the ports documented in infra/README.md."""

from __future__ import annotations

import configparser
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
POOL = "birefnet-process"
SECRET_KEY = re.compile(r"(password|passwd|secret|token|access_key|api_key|auth_string|credential)", re.I)
ENV_REF = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")


def _infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and "pyhooks" not in p.parts
                  and "__pycache__" not in p.parts)


def _yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) for every leaf and every mapping of a parsed document."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*path, str(i)))


def _images(docs: list[Any]) -> list[str]:
    return [value for docs_ in docs for path, value in _walk(docs_) if path and path[-1] == "image"
            and isinstance(value, str)]


def _dockerfile_bases(path: Path) -> list[str]:
    return [line.split()[1] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip().upper().startswith("FROM ")]


def _documented_ports() -> dict[int, str]:
    """port -> bind column of the table in infra/README.md."""
    rows = re.findall(r"^\|[^|\n]+\|[^|\n]+\|\s*(\d+)\s*\|\s*([^|\n]+?)\s*\|$", (INFRA / "README.md").read_text(),
                      re.M)
    return {int(port): bind for port, bind in rows}


PARSERS = {".yaml": _yaml, ".json": lambda p: [json.loads(p.read_text(encoding="utf-8"))],
           ".service": lambda p: [configparser.ConfigParser(strict=False, interpolation=None).read(p)],
           ".md": lambda p: [p.read_text(encoding="utf-8")], ".example": lambda p: [p.read_text(encoding="utf-8")],
           ".sql": lambda p: [p.read_text(encoding="utf-8")], ".gitignore": lambda p: [p.read_text(encoding="utf-8")],
           ".sh": lambda p: [subprocess.run(["sh", "-n", str(p)], check=True)],
           "Dockerfile": _dockerfile_bases}


def _kind(path: Path) -> str:
    return path.name if path.name in ("Dockerfile", ".gitignore") else path.suffix


def test_every_infra_file_has_a_parser_and_parses() -> None:
    files = _infra_files()
    assert len(files) >= 15, files
    for path in files:
        assert _kind(path) in PARSERS, f"{path}: no check for this kind of file; add one to this test"
        assert PARSERS[_kind(path)](path), path


def test_images_are_pinned() -> None:
    images: list[str] = []
    for path in _infra_files():
        if path.suffix == ".yaml":
            images += _images(_yaml(path))
        elif path.name == "Dockerfile":
            images += _dockerfile_bases(path)
    assert len(images) >= 10, images
    for image in images:
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{image}: tag must be a version, not {tag!r}"


def test_versions_match_the_locked_stack() -> None:
    import mlflow
    import prefect
    import ray

    bases = {p.parent.name: _dockerfile_bases(p)[0] for p in INFRA.rglob("Dockerfile")}
    assert bases["mlflow"] == f"ghcr.io/mlflow/mlflow:v{mlflow.__version__}"
    assert bases["ray"].startswith(f"rayproject/ray:{ray.__version__}-")
    prefect_compose = _yaml(INFRA / "prefect/docker-compose.yaml")[0]
    assert prefect_compose["services"]["server"]["image"].startswith(f"prefecthq/prefect:{prefect.__version__}-")
    rayjob = [d for d in _yaml(INFRA / "ray/rayjob.yaml") if d["kind"] == "RayJob"][0]
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def _secret_violations(path: Path) -> list[str]:
    bad: list[str] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".yaml":
        for doc in _yaml(path):
            for key_path, value in _walk(doc):
                key = key_path[-1] if key_path else ""
                if SECRET_KEY.search(key) and isinstance(value, str | int) and not ENV_REF.match(str(value)):
                    bad.append(f"{'.'.join(key_path)}: literal value")
                # Kubernetes env entries: {name: X_PASSWORD, value: ...} must use valueFrom.secretKeyRef
                if isinstance(value, dict) and SECRET_KEY.search(str(value.get("name", ""))):
                    if "value" in value or "secretKeyRef" not in value.get("valueFrom", {}):
                        bad.append(f"{'.'.join(key_path)}: env {value.get('name')} not from a Secret")
    # user:password@host in any URI: the password must be an environment reference
    for match in re.finditer(r"://[^/\s:@]+:([^@\s]+)@", text):
        if not ENV_REF.match(match.group(1)):
            bad.append(f"URI with a literal password: {match.group(0)}")
    # KEY=value / -e KEY=value / key = value assignments of secret-looking names
    assignment = (r"(?<![\w${])([A-Za-z_]*(?:PASSWORD|SECRET|TOKEN|ACCESS_KEY|AUTH_STRING)[A-Za-z_]*)"
                  r"[ \t]*[=:][ \t]*(\S*)")
    for match in re.finditer(assignment, text):  # env-style names; YAML keys are checked above
        value = match.group(2).strip("\"'")
        if match.group(1).endswith(("_PATH", "_FILE")):  # names a file holding the secret, e.g. RAY_AUTH_TOKEN_PATH
            continue
        if value and not value.startswith(("$", "{", "[", ">", "#", "<")) and not ENV_REF.match(value):
            if path.suffix == ".md" or value in ("|", "valueFrom"):
                continue
            bad.append(f"{match.group(0)!r}")
    return bad


def test_no_plaintext_secrets() -> None:
    violations = {str(p.relative_to(REPO)): v for p in [*_infra_files(), REPO / "prefect.yaml"]
                  if (v := _secret_violations(p))}
    assert not violations, violations


def test_secret_checker_catches_literals(tmp_path: Path) -> None:
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text("services:\n  db:\n    environment:\n      POSTGRES_PASSWORD: hunter2\n"
                     "    command: mlflow server --backend-store-uri postgresql://u:hunter2@db/x\n"
                     "env:\n  - {name: MLFLOW_TRACKING_PASSWORD, value: hunter2}\n", encoding="utf-8")
    assert len(_secret_violations(leaky)) >= 3


def test_env_examples_and_gitignores_keep_secrets_out() -> None:
    for folder in ("mlflow", "prefect"):
        values = dict(line.split("=", 1) for line in (INFRA / folder / "env.example").read_text().splitlines()
                      if line and not line.startswith("#"))
        assert values and all(v == "" for v in values.values()), values
        assert ".env" in (INFRA / folder / ".gitignore").read_text().split()


def test_published_ports_are_loopback_and_documented() -> None:
    documented = _documented_ports()
    assert documented[4200] == documented[5000] == documented[9000] == documented[9001] == "127.0.0.1"
    assert documented[5432] == "compose network only"
    for compose in INFRA.rglob("docker-compose.yaml"):
        services = _yaml(compose)[0]["services"]
        for name, service in services.items():
            for mapping in service.get("ports", []):
                host, host_port, container_port = str(mapping).split(":")
                assert host == "127.0.0.1", f"{compose}:{name} publishes {mapping} beyond loopback"
                assert int(host_port) in documented and documented[int(host_port)] == host, (compose, mapping)
                assert host_port == container_port
            if service["image"].startswith("postgres:"):
                assert "ports" not in service, f"{compose}: PostgreSQL must not be published"
    rayjob = [d for d in _yaml(INFRA / "ray/rayjob.yaml") if d["kind"] == "RayJob"][0]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} == {6379, 10001} <= set(documented)
    assert documented[8265].startswith("127.0.0.1")
    cluster = _yaml(INFRA / "ray/cluster.yaml")[0]
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--port=6379" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "--dashboard-port=8265" in head_start


def test_rayjob_trains_on_gpus_with_shared_storage() -> None:
    docs = {d["kind"]: d for d in _yaml(INFRA / "ray/rayjob.yaml")}
    pvc, job = docs["PersistentVolumeClaim"], docs["RayJob"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("birefnet train") and "train.use_gpu=true" in entry
    # the CPU default loads batches in the training process; GPU workers need loader processes
    workers = [int(w.split("=")[1]) for w in entry.split() if w.startswith("loader.workers=")]
    assert workers and workers[0] >= 2, entry
    assert "train.storage_path=/mnt/shared/" in entry and "shard.out=/mnt/shared/" in entry
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert claims["shared"] == pvc["metadata"]["name"] and mounts["shared"] == "/mnt/shared"
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert gpus and all(int(g) >= 1 for g in gpus)
    assert sum(g["replicas"] for g in cluster["workerGroupSpecs"]) >= 2


def test_cluster_launcher_is_multi_node_gpu_with_shared_storage() -> None:
    cfg = _yaml(INFRA / "ray/cluster.yaml")[0]
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "docker", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = [n for k, n in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert workers and workers[0]["min_workers"] >= 2
    assert workers[0]["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU families
    init = " ".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in init and "/mnt/shared" in init
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    assert all("--disable-usage-stats" in " ".join(cfg[k]) for k in ("head_start_ray_commands",
                                                                        "worker_start_ray_commands"))


def test_mlflow_server_uses_postgres_s3_and_basic_auth() -> None:
    services = _yaml(INFRA / "mlflow/docker-compose.yaml")[0]["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    entry = (INFRA / "mlflow/entrypoint.sh").read_text()
    assert "--app-name basic-auth" in entry and "admin_password = ${MLFLOW_ADMIN_PASSWORD}" in entry
    assert "--backend-store-uri" in entry and "--artifacts-destination" in entry
    assert "CREATE DATABASE mlflow_auth OWNER mlflow" in (INFRA / "mlflow/initdb/01-mlflow-role.sh").read_text()


def test_prefect_server_pool_and_worker() -> None:
    server = _yaml(INFRA / "prefect/docker-compose.yaml")[0]["services"]["server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert ENV_REF.match(server["environment"]["PREFECT_SERVER_API_AUTH_STRING"])
    assert server["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    template = json.loads((INFRA / "prefect/work-pool.json").read_text())
    assert {"job_configuration", "variables"} <= set(template)
    assert template["job_configuration"]["working_dir"] == "{{ working_dir }}"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(INFRA / "prefect/prefect-worker.service")
    assert f"--pool {POOL} --type process" in unit["Service"]["ExecStart"]
    assert unit["Service"]["KillSignal"] == "SIGINT"


def test_prefect_yaml_defines_the_retrain_deployment() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployment = next(d for d in doc["deployments"] if d["name"] == "retrain")
    file, func = deployment["entrypoint"].split(":")
    assert (REPO / file).is_file() and f"def {func}(" in (REPO / file).read_text()
    assert deployment["work_pool"]["name"] == POOL
    assert deployment["concurrency_limit"] == 1
    assert [CronSchedule(cron=s["cron"], timezone=s["timezone"]) for s in deployment["schedules"]]
    makefile = (REPO / "Makefile").read_text()
    assert f"PREFECT_POOL ?= {POOL}" in makefile


@pytest.mark.parametrize("name", ["rayjob.yaml", "cluster.yaml"])
def test_ray_manifests_point_at_the_project_image(name: str) -> None:
    images = _images(_yaml(INFRA / "ray" / name))
    assert images and all(i.startswith("registry.example.com/birefnet/birefnet-pipeline:") for i in images)
