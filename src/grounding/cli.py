"""The ``grounding`` command: tools around the pipeline (the stages themselves run from dvc.yaml).

``grounding sample --out data/sample`` regenerates the shipped synthetic sample, byte for byte.
``grounding predict IMAGE --phrase "a man" --phrase "a red shirt"`` grounds phrases in an image.
``grounding convert --from flickr30k --to odvg data/sample out`` converts a dataset's annotations.
``grounding export --format onnx --out models/grounder-onnx`` exports a grounder for onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from grounding import io
from grounding.data.formats import FORMATS
from grounding.errors import ConfigError, DataError, run
from grounding.inference.onnx_grounder import EXPORT_FORMATS
from grounding.numerics import NUMERICS, use_numerics

if TYPE_CHECKING:
    from grounding.inference.grounder import Grounder

#: What ``dvc repro`` writes and ``grounding predict`` loads by default.
TRAINED_GROUNDER = Path("models/grounder.safetensors")


def _sample(args: argparse.Namespace) -> None:
    from grounding.data.sample import generate_sample

    dataset = generate_sample(seed=args.seed, n_images=args.images)
    # replace an earlier sample's files, and nothing else that may live in the folder
    for name in ("Annotations", "Sentences", "images"):
        shutil.rmtree(args.out / name, ignore_errors=True)
    io.write_files(dataset.files, args.out)
    print(f"wrote {len(dataset.files)} files to {args.out}")


def _predict(args: argparse.Namespace) -> None:
    use_numerics(args.numerics, "--numerics")  # first: before anything loads torch
    from grounding.config import check_device_spec
    from grounding.inference.grounder import check_phrases, phrases_from_caption

    phrases = list(args.phrase)
    for caption in args.caption:
        phrases += phrases_from_caption(caption)
    if args.phrases_file:
        phrases += _read_phrases(args.phrases_file)
    phrases = check_phrases(phrases)
    if args.out and args.out.suffix.lstrip(".").lower() not in io.FIGURE_FORMATS:
        raise DataError(f"--out {args.out}: the picture must be one of {io.FIGURE_FORMATS}")
    if args.out:  # before grounding: a bad output place fails fast
        io.check_writable_file(args.out, "--out")
    if not args.no_cache:
        io.check_writable_folder(args.cache, "--cache")
    image = io.read_image(args.image)  # before the model: a bad image fails fast
    check_device_spec(args.device, "--device")  # before the model: a bad name fails fast
    started = time.perf_counter()
    grounder, out_of_memory_hint = _placed(
        load_grounder(_model_or_pretrained(args.model)), args.device
    )
    loaded = time.perf_counter()
    proposals = grounder.proposer(None if args.no_cache else io.ProposalCache(args.cache))
    with out_of_memory_hint:
        found = grounder.ground(image, phrases, top_k=args.top_k, proposals=proposals)
    done = time.perf_counter()
    result = {
        "image": str(args.image),
        "size": list(image.size),
        "threshold": grounder.threshold,
        "phrases": [grounding.to_dict() for grounding in found],
        "seconds": {"load_model": round(loaded - started, 3), "ground": round(done - loaded, 3)},
    }
    if args.out:
        from grounding.inference.drawing import groundings

        io.write_figure(groundings(image, found), args.out)
        result["out"] = str(args.out)
    json.dump(result, sys.stdout, indent=2)
    print()


def _placed(
    grounder: Grounder, device: str
) -> tuple[Grounder, contextlib.AbstractContextManager[object]]:
    """``grounder`` on the ``device`` that ``--device`` names, and the context that turns a GPU
    out of memory into a one-line error. An ONNX export runs on onnxruntime's CPU: ``auto`` and
    ``cpu`` keep it there without importing torch; ``cuda`` is refused."""
    from grounding.inference.onnx_grounder import OnnxGrounder

    if isinstance(grounder, OnnxGrounder):
        if device not in ("auto", "cpu"):
            raise ConfigError(
                f"--device {device}: an ONNX export runs on the CPU (onnxruntime); "
                "pass the torch grounder (its .safetensors file) as --model to use a GPU"
            )
        return grounder, contextlib.nullcontext()
    from grounding.modeling.device import gpu_memory_hint, resolve_device

    placed = resolve_device(device, "--device")
    hint = gpu_memory_hint(placed, "shrink the image or pass --device cpu")
    return grounder.to(placed), hint


def _read_phrases(path: Path) -> list[str]:
    """One phrase per line; blank lines are skipped."""
    try:
        # utf-8-sig: a byte order mark is not part of the first phrase
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read phrases ({error})") from None
    return [line for line in lines if line.strip()]


def _convert(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from grounding.config import load_params

    source, target = FORMATS[args.source], FORMATS[args.target]
    if target.write is None:  # argparse offers only writable formats
        raise ConfigError(f"--to {target.name}: the format is read-only")
    if not args.params.is_file():
        raise ConfigError(f"{args.params}: no params file (it names each split's file)")
    data = load_params(args.params).data
    reader = source.open(
        args.input,
        splits=args.input / data.splits,
        files=data.split_files(source.name),
        skip_bad_files=args.skip_bad_files,
    )
    written = target.write(tqdm(reader, desc=f"{source.name} -> {target.name}", unit="image"))
    files = data.split_files(target.name)
    for split, count in written.images.items():
        if count and split not in files:
            raise ConfigError(
                f"data.{target.name}.{split} is null in {args.params}, but {count} images are "
                f"in the {split} split"
            )
    for split, name in files.items():
        io.write_text(written.texts[split], args.output / name)
        print(f"{args.output / name}: {written.images[split]:,} images")
    left_out = dict(written.left_out)
    if reader.skipped:
        left_out["records that break the format (--skip-bad-files)"] = len(reader.skipped)
    for reason, count in left_out.items():
        print(f"left out: {count:,} {reason}")


def _export(args: argparse.Namespace) -> None:
    use_numerics(args.numerics, "--numerics")  # first: before anything loads torch
    started = time.perf_counter()
    grounder = load_grounder(args.model)
    written = EXPORT_FORMATS[args.format](grounder, args.out)
    size = sum(path.stat().st_size for path in written)
    print(
        f"wrote {args.format} export of {args.model} to {args.out}: {len(written)} files, "
        f"{size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s"
    )


def _model_or_pretrained(model: str | None, trained: Path = TRAINED_GROUNDER) -> str:
    """``--model`` when given, else the pipeline's trained grounder when it exists, else the
    packaged one (said on stderr: its boxes come from a model the user did not train)."""
    if model is not None:
        return model
    if trained.exists():
        return str(trained)
    from grounding.inference.grounder import pretrained_path

    packaged = pretrained_path()
    if not packaged.is_file():
        raise DataError(f"no --model given, no {trained} and no packaged grounder; train one")
    print(
        f"no --model given and no {trained}: using the packaged grounder trained on real "
        "Flickr30k images (non-commercial research terms; README: The packaged grounder)",
        file=sys.stderr,
    )
    return str(packaged)


def load_grounder(model: str) -> Grounder:
    """A :class:`~grounding.inference.grounder.Grounder` from its weights file
    (``models/grounder.safetensors``), a logged pyfunc model's folder, or an MLflow model URI
    (``runs:/<id>/grounder``, ``models:/phrase-grounder/<version>``) in the store of
    :mod:`grounding.tracking`; or an ONNX export's folder (``grounding export``), run with
    onnxruntime without importing torch."""
    from grounding.inference.onnx_grounder import OnnxGrounder, is_onnx_export

    path = Path(model)
    if is_onnx_export(path):
        return OnnxGrounder.load(path)
    from grounding.inference.grounder import Grounder

    if "://" not in model and ":/" not in model and not (path / "MLmodel").exists():
        if path.is_dir():
            raise DataError(
                f"{model}: a folder without an MLmodel file: neither a grounder weights file "
                "nor an MLflow model folder"
            )
        return Grounder.from_weights(*io.read_weights(path))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.exceptions import MlflowException

    store = _model_store(model) if ":/" in model else None
    if store:
        mlflow.set_tracking_uri(store)
    try:
        loaded = mlflow.pyfunc.load_model(model)
    except (MlflowException, OSError) as error:
        registry = os.environ.get("MLFLOW_REGISTRY_URI")
        named = (
            f"{store} (registry {registry})" if store and registry not in (None, store) else store
        )
        where = f" in the store {named}" if store else ""
        raise DataError(f"{model}: cannot load the model{where} ({error})") from None
    return _grounder_of(loaded, model)


def _model_store(model: str) -> str:
    """The tracking URI an MLflow model URI (``runs:/``, ``models:/``) is looked up in (that
    of :mod:`grounding.tracking`); :class:`DataError` naming the file if it, or the
    ``MLFLOW_REGISTRY_URI`` of a ``models:/`` URI, is a SQLite file that does not exist (MLflow
    would create an empty one)."""
    from grounding import tracking
    from grounding.config import repo_root

    uri = tracking.tracking_uri(repo_root())
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


def _grounder_of(loaded: object, model: str) -> Grounder:
    """The grounder inside a loaded pyfunc model; :class:`DataError` if it holds none."""
    from mlflow.exceptions import MlflowException

    from grounding.inference.grounder import Grounder

    try:
        grounder = getattr(loaded.unwrap_python_model(), "grounder", None)  # type: ignore[attr-defined]
    except MlflowException:  # a pyfunc of another flavour (sklearn, ...)
        grounder = None
    if not isinstance(grounder, Grounder):
        raise DataError(f"{model}: an MLflow model, but not a grounder of this project")
    return grounder


def _positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grounding/proposals"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grounding", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser(
        "sample",
        help="write the synthetic sample dataset in the Flickr30k Entities layout",
        description="Write the synthetic sample (images, Annotations/, Sentences/, split lists).",
    )
    sample.add_argument(
        "--out",
        type=Path,
        default=Path("data/sample"),
        help="folder; an earlier sample there is replaced",
    )
    sample.add_argument("--seed", type=int, default=0, help="random seed")
    sample.add_argument("--images", type=int, default=300, help="number of images")
    sample.set_defaults(handler=_sample)

    predict = commands.add_parser(
        "predict",
        help="ground phrases in an image: each phrase's best boxes as JSON",
        description=(
            "Ground phrases in an image with a trained grounder: its candidate generator's "
            "boxes (cached per image), one pass of the backbone for all phrases, the head's "
            "scores. "
            "Prints JSON: per phrase its best boxes (x1, y1, x2, y2 in pixels) with scores."
        ),
    )
    predict.add_argument("image", type=Path, help="the image file")
    predict.add_argument(
        "--phrase", action="append", default=[], help="a phrase to ground (repeatable)"
    )
    predict.add_argument(
        "--caption",
        action="append",
        default=[],
        help='a caption with [bracketed] phrases: "[A man] in [a red shirt]" (repeatable)',
    )
    predict.add_argument("--phrases-file", type=Path, help="a file of phrases, one per line")
    predict.add_argument(
        "--model",
        help="grounder weights file, pyfunc model folder, MLflow URI "
        "(runs:/<run id>/grounder, models:/phrase-grounder/<version>), or the folder of "
        "`grounding export --format onnx` (fastest to start); default "
        f"{TRAINED_GROUNDER}, or the packaged Flickr30k grounder when that does not exist",
    )
    predict.add_argument(
        "--top-k", type=_positive_int, default=1, help="boxes per phrase, >= 1 (default 1)"
    )
    predict.add_argument(
        "--out", type=Path, help="also draw the boxes and phrases on the image (.png, .jpg, ...)"
    )
    predict.add_argument(
        "--cache",
        type=Path,
        default=_default_cache(),
        help="folder of cached candidate boxes (default %(default)s)",
    )
    predict.add_argument("--no-cache", action="store_true", help="always compute the boxes")
    predict.add_argument(
        "--device",
        default="auto",
        help="auto (a GPU if torch sees one), cpu, cuda or cuda:N (default %(default)s)",
    )
    _numerics_argument(predict)
    predict.set_defaults(handler=_predict)

    convert = commands.add_parser(
        "convert",
        help="convert a dataset's annotations to another format (odvg, mdetr)",
        description=(
            "Read the annotations of the dataset at IN in one format and write them to OUT in "
            "another, each split to the file that params.yaml names for it (data.odvg, "
            "data.mdetr), so that the pipeline reads OUT with -S data.format=... -S "
            "data.root=OUT. Images are not copied: keep them in data.images under OUT. What "
            "the target format cannot hold is counted on the last lines."
        ),
    )
    convert.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=sorted(FORMATS),
        help="the format of IN",
    )
    convert.add_argument(
        "--to",
        dest="target",
        required=True,
        choices=sorted(name for name, fmt in FORMATS.items() if fmt.write is not None),
        help="the format to write (flickr30k is read-only)",
    )
    convert.add_argument("input", type=Path, metavar="IN", help="the dataset's folder")
    convert.add_argument("output", type=Path, metavar="OUT", help="the folder to write")
    convert.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file whose data section names each split's file (default %(default)s)",
    )
    convert.add_argument(
        "--skip-bad-files",
        action="store_true",
        help="leave out the records that break the format (counted) instead of stopping",
    )
    convert.set_defaults(handler=_convert)

    export = commands.add_parser(
        "export",
        help="export a grounder for a runtime without torch (onnx: onnxruntime)",
        description=(
            "Export a grounder's backbone with its RoIAlign, text encoder and head as ONNX "
            "graphs, with its tokenizer and a JSON of its threshold, candidate generator and "
            "feature settings (no pickle). `grounding predict --model OUT` and the MLflow "
            "pyfunc then run it with onnxruntime, without importing torch or transformers."
        ),
    )
    export.add_argument(
        "--format", choices=sorted(EXPORT_FORMATS), default="onnx", help="default %(default)s"
    )
    export.add_argument(
        "--model",
        default="models/grounder.safetensors",
        help="the grounder, as `predict --model` takes it; default %(default)s",
    )
    export.add_argument(
        "--out", type=Path, default=Path("models/grounder-onnx"), help="folder (%(default)s)"
    )
    _numerics_argument(export)
    export.set_defaults(handler=_export)
    return parser


def _numerics_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--numerics",
        choices=NUMERICS,
        default="portable",
        help="torch's CPU kernels: portable (the same bytes on every x86-64 CPU with AVX2) or "
        "fast (this CPU's newest); default %(default)s",
    )


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


def main(argv: list[str] | None = None) -> None:
    run(_main, argv)


if __name__ == "__main__":
    main()
