"""The file MLflow runs to build the registered pyfunc model ("models from code": no pickle).

Registered versions carry this file and the ``tasks`` package; the settings (decoding, batch
size) come from the version's ``model_config``, the weights from its ``model`` artifact.
"""

from mlflow.models import set_model

from tasks.model.serving import ImageClassifierModel

set_model(ImageClassifierModel())
