#!/bin/sh
# Render the basic-auth config from the environment (no password in any file of the repository), then start
# the tracking server. Every variable below comes from the compose file, which takes it from .env / the shell.
set -eu
: "${MLFLOW_ADMIN_PASSWORD:?MLFLOW_ADMIN_PASSWORD is not set}"
: "${MLFLOW_BACKEND_STORE_URI:?MLFLOW_BACKEND_STORE_URI is not set}"
: "${MLFLOW_AUTH_DATABASE_URI:?MLFLOW_AUTH_DATABASE_URI is not set}"
umask 077
mkdir -p /run/mlflow
cat > /run/mlflow/basic_auth.ini <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_ADMIN_USERNAME:-admin}
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH=/run/mlflow/basic_auth.ini
exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow-artifacts}" \
  --serve-artifacts \
  --host 0.0.0.0 --port 5000 --workers "${MLFLOW_WORKERS:-4}"
