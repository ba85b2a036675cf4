"""Inference: predict files and arrays, serve as an MLflow pyfunc, export to ONNX.

Modules: ``processing`` (resize and normalise in, logits to masks at the original size out, cut-outs, size checks;
shared by the others), ``predict`` (model loading and :func:`~birefnet.inference.predict.predict_files`), ``files``
(input expansion and output naming of ``predict``), ``foreground`` (foreground colours of soft cut-outs),
``serving`` (the pyfunc class), ``pyfunc_model`` (its models-from-code entry file, never imported) and ``export``
(ONNX and its parity check). Nothing here imports ``birefnet.training`` or Ray; importing the package imports none
of its modules (the registry ships only the serving part as model code).
"""
