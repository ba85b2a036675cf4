"""Prefect flows for the BiRefNet pipeline: one thin flow per DVC stage, plus ``retrain``.

The flows call the same ``birefnet.stages.<stage>.run()`` functions that ``dvc repro`` runs through the
``birefnet`` command line, so both entry points write the same files. Framework code (Prefect) stays here;
everything that computes lives in ``birefnet/``.
"""

from birefnet.offline import apply_offline_env

# The flows' entry points (`python -m pipelines.retrain`, the worker's flow runs) start here, before Prefect is
# imported (it reads PREFECT_HOME at import): the repository's telemetry and loopback switches apply without make.
# Keys already set in the environment are left alone.
apply_offline_env()
