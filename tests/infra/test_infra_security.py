"""Network exposure and credentials of the team setup under infra/: Ray token authentication, a dashboard on
loopback, a NetworkPolicy around the Ray pods, and MLflow on scoped database and bucket credentials."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
RAY_POD_LABELS = {"app.kubernetes.io/name": "birefnet", "app.kubernetes.io/component": "ray-node"}


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _rayjob() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in _docs(INFRA / "ray/rayjob.yaml")}


def _pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (str(key), *_strings(value))]
    if isinstance(node, list):
        return [s for value in node for s in _strings(value)]
    return [str(node)]


def test_rayjob_enables_token_auth_in_every_container() -> None:
    job = _rayjob()["RayJob"]
    containers = [c for pod in _pod_templates(job) for c in pod["spec"]["containers"]]
    names = {c["name"] for c in containers}
    assert {"ray-head", "ray-job-submitter", "ray-worker"} <= names, names
    token_refs = set()
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (container["name"], env.get("RAY_AUTH_MODE"))
        token = env.get("RAY_AUTH_TOKEN")
        assert token and "value" not in token, (container["name"], token)
        ref = token["valueFrom"]["secretKeyRef"]
        token_refs.add((ref["name"], ref["key"]))
    assert len(token_refs) == 1, f"head, workers and submitter must share one token: {token_refs}"


def test_rayjob_dashboard_stays_on_loopback() -> None:
    job = _rayjob()["RayJob"]
    spec = job["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    # the submitter reaches the dashboard on localhost from inside the head pod
    assert spec["submissionMode"] == "SidecarMode"
    assert head["template"]["spec"]["restartPolicy"] == "Never"
    ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert 8265 not in ports, ports
    for doc in _docs(INFRA / "ray/rayjob.yaml"):
        assert not [s for s in _strings(doc) if "0.0.0.0" in s or s == "::"], doc["kind"]


def test_rayjob_network_policy_admits_only_the_ray_pods() -> None:
    docs = _rayjob()
    policy = docs["NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selected = spec["podSelector"]["matchLabels"]
    for pod in _pod_templates(docs["RayJob"]):
        labels = pod["metadata"]["labels"]
        assert selected.items() <= labels.items(), (selected, labels)
    assert selected == RAY_POD_LABELS
    (rule,) = spec["ingress"]
    # one peer, a pod selector of this namespace: no namespaceSelector, no ipBlock, nothing from outside
    assert rule["from"] == [{"podSelector": {"matchLabels": RAY_POD_LABELS}}], rule
    assert "ports" not in rule  # Ray's raylets, object managers and workers use dynamic ports among themselves


def test_cluster_launcher_enables_token_auth_from_a_token_file() -> None:
    cfg = _docs(INFRA / "ray/cluster.yaml")[0]
    options = cfg["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in options
    path = next(o.split("=", 1)[1] for o in options if o.startswith("-e RAY_AUTH_TOKEN_PATH="))
    folder = str(Path(path).parent)
    assert f"-v {folder}:{folder}:ro" in options, options
    assert not any(o.startswith("-e RAY_AUTH_TOKEN=") for o in options), "the token itself stays out of the file"
    init = " ".join(cfg["initialization_commands"])
    assert "secretsmanager get-secret-value" in init and path in init and "-m 0400" in init
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts
    assert "0.0.0.0" not in (INFRA / "ray/cluster.yaml").read_text(encoding="utf-8")


def test_mlflow_server_uses_a_scoped_database_role() -> None:
    services = _docs(INFRA / "mlflow/docker-compose.yaml")[0]["services"]
    postgres_env, mlflow_env = services["postgres"]["environment"], services["mlflow"]["environment"]
    superuser = postgres_env["POSTGRES_USER"]
    assert superuser != "mlflow"
    for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI"):
        match = re.match(r"postgresql://([^:]+):\$\{([A-Z_]+)[^}]*\}@postgres:5432/(\w+)$", mlflow_env[key])
        assert match, (key, mlflow_env[key])
        user, password_variable, database = match.groups()
        assert user == "mlflow" and database in ("mlflow", "mlflow_auth")
        assert password_variable == "MLFLOW_DB_PASSWORD"
        assert password_variable not in postgres_env["POSTGRES_PASSWORD"]
    assert "MLFLOW_DB_PASSWORD" in postgres_env  # handed to the init script only
    script = (INFRA / "mlflow/initdb/01-mlflow-role.sh").read_text(encoding="utf-8")
    create_role = re.search(r"CREATE ROLE mlflow ([^']*)", script)
    assert create_role, script
    for attribute in ("LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE"):
        assert attribute in create_role.group(1).split(), attribute
    for database in ("mlflow", "mlflow_auth"):
        assert f"CREATE DATABASE {database} OWNER mlflow;" in script
        assert f"REVOKE ALL ON DATABASE {database} FROM PUBLIC;" in script
    assert "$MLFLOW_DB_PASSWORD" not in script.split("<<'SQL'", 1)[1], "the password must not be spliced into SQL"


def test_mlflow_server_uses_a_bucket_scoped_minio_user() -> None:
    services = _docs(INFRA / "mlflow/docker-compose.yaml")[0]["services"]
    mlflow_env = services["mlflow"]["environment"]
    assert not [k for k, v in mlflow_env.items() if "MINIO_ROOT" in str(v) or "MINIO_ROOT" in k], mlflow_env
    assert mlflow_env["AWS_ACCESS_KEY_ID"].startswith("${MLFLOW_S3_ACCESS_KEY")
    assert mlflow_env["AWS_SECRET_ACCESS_KEY"].startswith("${MLFLOW_S3_SECRET_KEY")
    bucket = mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].removeprefix("s3://")
    init = services["create-bucket"]
    command = " ".join(init["command"])
    mount = next(v for v in init["volumes"] if v.startswith("./minio-policy.json:"))
    policy_path = mount.split(":")[1]
    assert f"mc mb --ignore-existing store/{bucket}" in command
    assert f"mc admin policy create store mlflow-artifacts-rw {policy_path}" in command
    assert 'mc admin user add store "$$MLFLOW_S3_ACCESS_KEY" "$$MLFLOW_S3_SECRET_KEY"' in command
    assert 'mc admin policy attach store mlflow-artifacts-rw --user "$$MLFLOW_S3_ACCESS_KEY"' in command
    policy = json.loads((INFRA / "mlflow/minio-policy.json").read_text(encoding="utf-8"))
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, resources
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert all(statement["Effect"] == "Allow" for statement in policy["Statement"])
    assert not [a for a in actions if "*" in a or a.startswith("admin:")], actions
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    example = (INFRA / "mlflow/env.example").read_text(encoding="utf-8")
    for key in ("POSTGRES_SUPERUSER_PASSWORD", "MLFLOW_DB_PASSWORD", "MLFLOW_S3_ACCESS_KEY", "MLFLOW_S3_SECRET_KEY"):
        assert re.search(rf"^{key}=$", example, re.M), key
