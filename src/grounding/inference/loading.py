"""The one loader of a grounder: the CLI, the MLflow pyfunc (``mlflow models serve``) and the
batch path all call :func:`load_grounder`.

A grounder is loaded from what this project writes, and from nothing else:

- ``pretrained``: the packaged grounder (trained on real Flickr30k Entities photos);
- ``hf:<model id or folder>``: a Hugging Face model that grounds with no training (CLIP,
  SigLIP, OWLv2, OWL-ViT, Grounding DINO: :mod:`grounding.inference.zero_shot`; safetensors
  weights only);
- a weights file (``models/grounder.safetensors``): tensors and a JSON config, no code;
- the folder of an ONNX export (``grounding export``): graphs and JSON, no code;
- an MLflow model folder, or an MLflow model URI (``runs:/<id>/grounder``,
  ``models:/phrase-grounder/<version>``, whose artifacts are downloaded first): its
  ``MLmodel`` file (plain YAML) is read and checked before anything else is touched. Only this
  project's own grounder passes: the models-from-code entry
  (:mod:`grounding.inference.mlflow_model`, byte for byte) and one artifact ``grounder``, a
  weights file or an ONNX export, which is then loaded as above. The model's code is never run
  and no pickle is ever read: anything else (a ``python_model.pkl``, another loader module,
  another flavour) is refused with one line that says what was found.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from grounding.errors import DataError, redact
from grounding.inference.grounder import Grounder
from grounding.inference.onnx_grounder import is_onnx_export, load_export

#: ``--model`` / :func:`load_grounder`'s name of the packaged grounder.
PRETRAINED_NAME = "pretrained"
#: What MLflow writes for a model from code, and the code of ours it copies into the model.
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
#: ``--model hf:<model id or folder>``: a Hugging Face model grounds without training.
HF_PREFIX = "hf:"
#: The name of the grounder's one artifact in the MLflow model.
ARTIFACT = "grounder"


def load_grounder(model: str, device: str = "auto", *, where: str = "device") -> Grounder:
    """The grounder that ``model`` names (see the module docstring), placed on ``device``
    (``auto``: a GPU if torch sees one; ``cpu``; ``cuda``; ``cuda:N``; an ONNX export stays on
    the CPU). Its :attr:`~grounding.inference.grounder.Grounder.source` is ``model``.

    Raises :class:`DataError` with one line for a path that does not exist, a file or folder
    that is not a grounder of this project, or a foreign MLflow model (refused before any of it
    is read); :class:`~grounding.errors.ConfigError` naming ``where`` for a device this
    machine lacks."""
    from grounding.inference.grounder import pretrained_path

    model = str(model)
    if model == PRETRAINED_NAME:
        path = pretrained_path()
        if not path.is_file():
            raise DataError(f"{model}: the packaged grounder {path} is missing from this install")
        grounder = _from_path(path, model)
        grounder.source = f"{PRETRAINED_NAME} ({path})"
    elif model.startswith(HF_PREFIX):  # a zero-training grounder of a Hugging Face model
        from grounding.inference.zero_shot import zero_shot_grounder

        grounder = zero_shot_grounder(model.removeprefix(HF_PREFIX))
        grounder.source = model
    elif is_mlflow_uri(model):
        grounder = _from_mlflow_uri(model)
        grounder.source = model
    else:
        path = Path(model)
        if not path.exists():
            raise DataError(f"{model}: no such file or folder")
        grounder = _from_path(path, model)
        grounder.source = model
    return grounder.place(device, where)


def is_mlflow_uri(model: str) -> bool:
    """Whether ``model`` is an MLflow model URI (``runs:/``, ``models:/``, any ``scheme:/``)
    rather than a local path."""
    if model.startswith(HF_PREFIX):  # hf:/path/to/folder names a Hugging Face model
        return False
    scheme, separator, _ = model.partition(":/")
    return bool(separator) and scheme.isidentifier() and len(scheme) > 1


def _from_path(path: Path, model: str) -> Grounder:
    """A grounder from a local weights file, ONNX export or MLflow model folder."""
    if is_onnx_export(path):
        return load_export(path)
    if path.is_dir():
        if not (path / "MLmodel").is_file():
            raise DataError(
                f"{model}: a folder without an MLmodel file or grounder.json: neither an MLflow "
                "model folder nor an ONNX export"
            )
        return _from_model_folder(path, model)
    from grounding.io import read_weights

    return Grounder.from_weights(*read_weights(path))


def _from_model_folder(folder: Path, model: str) -> Grounder:
    """The grounder of an MLflow model folder, after :func:`check_mlmodel`."""
    artifact = check_mlmodel(folder, model)
    if is_onnx_export(artifact) or artifact.is_file():
        return _from_path(artifact, model)
    raise DataError(f"{model}: its artifact {ARTIFACT!r} is neither a weights file nor an export")


def check_mlmodel(folder: Path, model: str) -> Path:
    """The path of the ``grounder`` artifact of the MLflow model in ``folder``, after checking
    from its ``MLmodel`` file alone that it is this project's grounder; :class:`DataError`
    saying what was found otherwise. Reads YAML and compares bytes: runs nothing."""
    import yaml

    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise DataError(f"{model}: cannot read its MLmodel file ({error})") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    if not isinstance(pyfunc, dict):
        raise _refusal(model, "an MLmodel file without a python_function flavour")
    others = sorted(set(flavors) - {"python_function"})
    if others:
        raise _refusal(model, f"an MLflow model of the flavour(s) {', '.join(others)}")
    loader = pyfunc.get("loader_module")
    if "python_model" in pyfunc:
        raise _refusal(model, f"a pickled Python model ({pyfunc['python_model']})")
    if loader != CODE_LOADER:
        raise _refusal(model, f"a model loaded by the module {loader!r}")
    code = folder / Path(str(pyfunc.get("model_code_path") or "")).name
    if not code.is_file() or code.read_bytes() != MODEL_CODE.read_bytes():
        raise _refusal(model, f"a model from code whose code is not this project's ({code.name})")
    artifacts: Any = pyfunc.get("artifacts")
    if not isinstance(artifacts, dict) or set(artifacts) != {ARTIFACT}:
        found = sorted(artifacts) if isinstance(artifacts, dict) else "none"
        raise _refusal(model, f"artifacts {found} instead of one {ARTIFACT!r}")
    entry = artifacts[ARTIFACT]
    relative = entry.get("path") if isinstance(entry, dict) else None
    path = (folder / str(relative)).resolve()
    if not relative or not path.is_relative_to(folder.resolve()):
        raise _refusal(model, f"an artifact {ARTIFACT!r} outside the model folder ({relative})")
    return path


def _refusal(model: str, found: str) -> DataError:
    """The one line that refuses a foreign MLflow model: what was found, how to load it."""
    return DataError(
        f"{model}: {found}, not this project's grounder (its models-from-code entry and a "
        "safetensors or ONNX artifact); refused without loading any of it. To run a foreign "
        f"model deliberately, load it yourself: mlflow.pyfunc.load_model({model!r}) runs its code"
    )


def _from_mlflow_uri(model: str) -> Grounder:
    """Download the model's files from the store of :func:`grounding.config.tracking_uri`
    into a temporary folder, check them as a local model folder, load them into memory."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.exceptions import MlflowException

    store = model_store(model)
    mlflow.set_tracking_uri(store)
    with tempfile.TemporaryDirectory(prefix="grounder-") as scratch:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=scratch))
        except (MlflowException, OSError) as error:
            registry = os.environ.get("MLFLOW_REGISTRY_URI")
            named = f"{store} (registry {registry})" if registry not in (None, store) else store
            message = " ".join(str(error).split())
            raise DataError(
                redact(f"{model}: cannot load the model in the store {named} ({message})")
            ) from None
        if not (folder / "MLmodel").is_file():
            raise DataError(f"{model}: not an MLflow model (no MLmodel file among its artifacts)")
        return _from_model_folder(folder, model)


def model_store(model: str) -> str:
    """The tracking URI an MLflow model URI (``runs:/``, ``models:/``) is looked up in (that
    of :func:`grounding.config.tracking_uri`); :class:`DataError` naming the file if it, or the
    ``MLFLOW_REGISTRY_URI`` of a ``models:/`` URI, is a SQLite file that does not exist (MLflow
    would create an empty one)."""
    from grounding.config import repo_root, tracking_uri

    uri = tracking_uri(repo_root())
    registry = os.environ.get("MLFLOW_REGISTRY_URI")
    for store in (uri, registry if model.startswith("models:/") else None):
        if store and store.startswith("sqlite:///"):
            database = Path(store.removeprefix("sqlite:///"))
            if not database.is_file():
                raise DataError(
                    f"{model}: cannot load the model: no MLflow store at {database.absolute()} "
                    "(run from the repository that logged it, or set MLFLOW_TRACKING_URI)"
                )
    return uri
