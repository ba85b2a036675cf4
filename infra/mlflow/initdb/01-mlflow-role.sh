#!/bin/sh
# First start of the PostgreSQL volume only (docker-entrypoint-initdb.d), run as the superuser "postgres":
# a dedicated login role "mlflow" without superuser, role-creation or database-creation rights that owns exactly
# two databases, "mlflow" (runs, registry) and "mlflow_auth" (basic-auth users). Other roles cannot connect to
# them. The password comes from MLFLOW_DB_PASSWORD (compose, from .env) and reaches SQL as a psql variable,
# quoted by format(%L), never spliced into the SQL text.
set -eu
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set=role_secret="$MLFLOW_DB_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L',
              :'role_secret') \gexec
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
SQL
