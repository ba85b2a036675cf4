"""One module per dvc.yaml stage: load the stage's params, read paths, write paths, call the library."""
