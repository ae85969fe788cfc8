"""The grounder as an MLflow model from code: MLflow copies this file into the logged model
and runs it to build the model when it is loaded, so nothing is unpickled (the weights are
the safetensors artifact ``grounder``). Not imported by the package."""

from mlflow.models import set_model

from grounding.inference.serving import GrounderModel

set_model(GrounderModel())
