"""MLflow "models from code" entry for a registered BiRefNet version (no pickle).

``mlflow.pyfunc.log_model(python_model=<this file>, ...)`` copies this file into the model folder; loading the
model executes it, and ``set_model`` hands MLflow the :class:`birefnet.inference.serving.BiRefNetPyfunc` instance
whose ``load_context`` rebuilds the network from the safetensors artifact. The file exists for that purpose only:
it is never imported by the library.
"""

from __future__ import annotations

from mlflow.models import set_model

from birefnet.inference.serving import BiRefNetPyfunc

set_model(BiRefNetPyfunc())
