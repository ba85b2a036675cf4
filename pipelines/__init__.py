"""Prefect flows for the BiRefNet pipeline: one thin flow per DVC stage, plus ``retrain``.

The flows call the same ``birefnet.stages.<stage>.run()`` functions that ``dvc repro`` runs through the
``birefnet`` command line, so both entry points write the same files. Framework code (Prefect) stays here;
everything that computes lives in ``birefnet/``.
"""
