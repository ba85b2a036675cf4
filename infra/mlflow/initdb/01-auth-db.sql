-- A second database for MLflow's basic-auth users and permissions (the tracking data lives in "mlflow").
CREATE DATABASE mlflow_auth OWNER mlflow;
