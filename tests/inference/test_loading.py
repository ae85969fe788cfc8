"""The one loader of a grounder: every kind of model it takes, and the foreign ones it refuses
before reading a byte of them (a pickle payload must never run). The grounder is the stand-in
models' weights file."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import stand_ins
import yaml

from grounding.cli import main as cli_main
from grounding.errors import DataError
from grounding.inference.grounder import Grounding, TrainedOn, grounder_weights
from grounding.inference.loading import MODEL_CODE, is_mlflow_uri, load_grounder
from grounding.inference.serving import GrounderModel
from grounding.io import write_weights

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IMAGE = REPO / "data" / "sample" / "images" / "100000001.jpg"


class Payload:
    """A pickle that writes ``path`` when it is unpickled: what a crafted model holds."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.path)!r}, 'w').write('pwned')",)


class Echo:
    """Stands for any foreign Python model (pickled by MLflow)."""


@pytest.fixture
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    stand_ins.install(monkeypatch)
    return stand_ins.write_grounder(tmp_path / "grounder.safetensors")


def save_grounder_model(weights: Path, folder: Path) -> Path:
    """This project's MLflow model of the grounder file ``weights``, as the report stage logs
    it (a model from code with the safetensors artifact)."""
    import mlflow

    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(MODEL_CODE),
        artifacts={"grounder": str(weights)},
        pip_requirements=["grounding"],
    )
    return folder


def edit_mlmodel(folder: Path, **changes: object) -> None:
    """Change entries of the python_function flavour of ``folder``'s MLmodel file."""
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"].update(changes)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def predict_error(model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The last stderr line of a `grounding predict` that must fail with status 1."""
    image = tmp_path / "shapes.png"
    stand_ins.two_shapes().save(image)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["predict", str(image), "--phrase", "a man", "--model", model, "--no-cache"])
    assert exit_.value.code == 1
    return capsys.readouterr().err.strip().splitlines()[-1]


# --- what loads -------------------------------------------------------------------------------


def test_a_weights_file_and_this_projects_mlflow_folder_load(weights: Path, tmp_path: Path) -> None:
    folder = save_grounder_model(weights, tmp_path / "model")
    for model in (str(weights), str(folder)):
        grounder = load_grounder(model, "cpu")
        assert grounder.source == model
        assert (grounder.threshold, grounder.candidates) == (0.5, "selective_search")
        assert grounder.ground(stand_ins.two_shapes(), ["a red box"])[0].boxes


def test_the_pyfunc_loads_its_artifact_through_the_loader(weights: Path) -> None:
    model = GrounderModel()
    model.load_context(SimpleNamespace(artifacts={"grounder": str(weights)}))
    assert model.grounder.source == str(weights)


def test_mlflow_uris_are_told_from_paths() -> None:
    assert is_mlflow_uri("runs:/0123/grounder") and is_mlflow_uri("models:/phrase-grounder/1")
    assert not is_mlflow_uri("models/grounder.safetensors")
    assert not is_mlflow_uri("C:/models/grounder.safetensors")


# --- what is refused, unread ------------------------------------------------------------------


def test_a_pickle_payload_in_an_mlflow_folder_is_refused_and_never_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ordinary `mlflow.pyfunc.save_model` folder whose python_model.pkl was replaced."""
    import mlflow

    folder, witness = tmp_path / "crafted", tmp_path / "payload-ran"
    mlflow.pyfunc.save_model(str(folder), python_model=Echo_model(), pip_requirements=[])
    (folder / "python_model.pkl").write_bytes(pickle.dumps(Payload(witness)))
    last = predict_error(str(folder), tmp_path, capsys)
    assert not witness.exists(), "the payload ran"
    assert last.startswith(f"error: {folder}: a pickled Python model (python_model.pkl)"), last
    assert "mlflow.pyfunc.load_model" in last  # how to load a foreign model deliberately


def test_a_pickle_in_place_of_the_weights_file_is_refused_and_never_runs(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, witness = save_grounder_model(weights, tmp_path / "model"), tmp_path / "payload-ran"
    (folder / "artifacts" / weights.name).write_bytes(pickle.dumps(Payload(witness)))
    last = predict_error(str(folder), tmp_path, capsys)
    assert not witness.exists(), "the payload ran"
    assert "not a model file of this project (safetensors with a config)" in last, last
    with pytest.raises(DataError, match="not a model file of this project"):
        GrounderModel().load_context(
            SimpleNamespace(artifacts={"grounder": str(folder / "artifacts" / weights.name)})
        )
    assert not witness.exists()


@pytest.mark.parametrize(
    "changes, found",
    [
        ({"loader_module": "mlflow.sklearn"}, "a model loaded by the module 'mlflow.sklearn'"),
        ({"loader_module": "mlflow.pyfunc.model", "python_model": "model.pkl"}, "a pickled Python"),
        (
            {"artifacts": {"grounder": {"path": "../elsewhere.safetensors"}}},
            "an artifact 'grounder' outside",
        ),
        ({"artifacts": {}}, "artifacts [] instead of one 'grounder'"),
    ],
)
def test_an_mlmodel_naming_another_loader_or_artifact_is_refused(
    changes: dict, found: str, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_grounder_model(weights, tmp_path / "model")
    edit_mlmodel(folder, **changes)
    last = predict_error(str(folder), tmp_path, capsys)
    assert last.startswith(f"error: {folder}: {found}"), last
    assert "not this project's grounder" in last


def test_model_code_other_than_this_projects_is_refused(weights: Path, tmp_path: Path) -> None:
    folder = save_grounder_model(weights, tmp_path / "model")
    (folder / MODEL_CODE.name).write_text("import os  # anything at all\n")
    with pytest.raises(DataError, match="a model from code whose code is not this project's"):
        load_grounder(str(folder), "cpu")


def test_a_path_that_does_not_exist_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = predict_error("/no/such/dir", tmp_path, capsys)
    assert last == "error: /no/such/dir: no such file or folder"


# --- MLflow URIs: downloaded, then checked ----------------------------------------------------


def test_runs_and_models_uris_load_this_projects_grounder_and_refuse_a_pickle(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("loading")
    with mlflow.start_run() as run:
        mlflow.pyfunc.log_model(
            name="grounder",
            python_model=str(MODEL_CODE),
            artifacts={"grounder": str(weights)},
            pip_requirements=["grounding"],
            registered_model_name="phrase-grounder",
        )
        crafted = mlflow.pyfunc.log_model(
            name="crafted", python_model=Echo_model(), pip_requirements=[]
        )
    for uri in (f"runs:/{run.info.run_id}/grounder", "models:/phrase-grounder/1"):
        grounder = load_grounder(uri, "cpu")
        assert (grounder.source, grounder.threshold) == (uri, 0.5)
    with pytest.raises(DataError, match="a pickled Python model"):
        load_grounder(crafted.model_uri, "cpu")


# --- the public API and which model answered --------------------------------------------------


def test_import_grounding_stays_light() -> None:
    heavy = "('torch', 'mlflow', 'numpy')"
    script = f"import sys, grounding; print([m for m in {heavy} if m in sys.modules])"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_public_api_grounds_with_plain_typed_results(weights: Path) -> None:
    from grounding import load_grounder as public

    grounder = public(str(weights))
    found = grounder.ground(stand_ins.two_shapes(), ["a red box", "a blue box"])
    assert [g.phrase for g in found] == ["a red box", "a blue box"]
    for grounding in found:
        assert isinstance(grounding, Grounding)
        assert all(isinstance(v, int) for v in grounding.box) and len(grounding.box) == 4
        assert 0.0 <= grounding.score <= 1.0
        assert grounding.above_threshold == (grounding.score >= 0.5)
    with pytest.raises(AttributeError):
        found[0].phrase = "changed"  # type: ignore[misc]


def write_sample_grounder(path: Path) -> Path:
    """The stand-in grounder, saying it was trained on the synthetic sample."""
    trained_on = TrainedOn("sample", "flickr30k", 299, synthetic=True)
    weights = grounder_weights(
        stand_ins.trained_head(),
        threshold=0.5,
        candidates="selective_search",
        settings=stand_ins.SETTINGS,
        trained_on=trained_on,
    )
    write_weights(*weights, path)
    return path


def test_predict_names_its_model_and_warns_a_sample_model_is_not_for_photos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_ins.install(monkeypatch)
    monkeypatch.chdir(tmp_path)
    model = write_sample_grounder(tmp_path / "grounder.safetensors")
    stand_ins.two_shapes().save(tmp_path / "photo.png")
    if not SAMPLE_IMAGE.is_file():
        pytest.skip(f"the sample is absent: {SAMPLE_IMAGE}")
    (tmp_path / "data" / "sample" / "images").mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGE, tmp_path / "data" / "sample" / "images")
    shutil.copy(SAMPLE_IMAGE, tmp_path / "from-the-sample.jpg")
    answers = {}
    for image in ("photo.png", "from-the-sample.jpg"):
        argv = ["predict", image, "--phrase", "a red box", "--model", str(model), "--no-cache"]
        cli_main(argv)
        answers[image] = capsys.readouterr()
    photo = answers["photo.png"]
    assert json.loads(photo.out)["model"] == {
        "source": str(model),
        "trained_on": {"name": "sample", "format": "flickr30k", "images": 299, "synthetic": True},
    }
    assert f"model: {model}, trained on sample (299 images, synthetic shapes)" in photo.err
    assert "only knows the synthetic shapes of data/sample" in photo.err
    assert "--model pretrained" in photo.err
    sample = answers["from-the-sample.jpg"]
    assert "model: " in sample.err and "only knows" not in sample.err


def test_the_served_table_names_the_model(weights: Path) -> None:
    import io

    import pandas as pd

    from grounding.inference.serving import encode_image

    model = GrounderModel()
    model.load_context(SimpleNamespace(artifacts={"grounder": str(weights)}))
    buffer = io.BytesIO()
    stand_ins.two_shapes().save(buffer, format="PNG")
    table = pd.DataFrame({"image": [encode_image(buffer.getvalue())], "phrase": ["a red box"]})
    result = model.predict(None, table)
    assert result["model"].tolist() == [
        f"{weights}, trained on unknown data (its config does not say; rebuild it with `dvc repro`)"
    ]
    assert np.isfinite(result["score"].astype(float)).all()


def Echo_model():
    import mlflow

    class EchoModel(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    return EchoModel()
