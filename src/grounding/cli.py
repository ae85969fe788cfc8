"""The ``grounding`` command: tools around the pipeline (the stages themselves run from dvc.yaml).

``grounding sample --out data/sample`` regenerates the shipped synthetic sample, byte for byte.
``grounding predict IMAGE... --phrase "a man" --phrase "a red shirt"`` grounds phrases in images.
``grounding convert --from flickr30k --to odvg data/sample out`` converts a dataset's annotations.
``grounding export --format onnx --out models/grounder-onnx`` exports a grounder for onnxruntime.
``grounding demo`` serves a local web page to try a grounder on uploaded photos.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from grounding import io
from grounding.data.formats import FORMATS, dataset_format, writable_formats
from grounding.data.sample import SAMPLE_ROOT, from_sample
from grounding.errors import ConfigError, DataError, run
from grounding.inference.loading import PRETRAINED_NAME, is_mlflow_uri, load_grounder
from grounding.inference.onnx_grounder import EXPORT_FORMATS
from grounding.numerics import NUMERICS, use_numerics

if TYPE_CHECKING:
    from grounding.inference.grounder import Grounder

#: What ``dvc repro`` writes and ``grounding predict`` loads by default.
TRAINED_GROUNDER = Path("models/grounder.safetensors")
#: The JSON Lines file of ``grounding predict --out-dir``: one record per grounded image.
PREDICTIONS_FILE = "predictions.jsonl"
#: The Label Studio tasks of ``grounding predict --out-dir OUT --labelstudio ROOT``.
LABELSTUDIO_FILE = "labelstudio.json"
#: What a GPU out of memory while grounding tells the user to change.
OUT_OF_MEMORY_ADVICE = "shrink the image or pass --device cpu"


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
    from grounding.inference.batch import check_threshold
    from grounding.inference.grounder import check_phrases, phrases_from_caption

    phrases = list(args.phrase)
    for caption in args.caption:
        phrases += phrases_from_caption(caption)
    if args.phrases_file:
        phrases += _read_phrases(args.phrases_file)
    phrases = check_phrases(phrases)
    if args.threshold is not None:
        check_threshold(args.threshold)
    sources = [*args.images, *(f"@{path}" for path in args.list)]
    if not sources:
        raise DataError("no image given: name image files, folders, globs or @list.txt")
    if args.out and args.out.suffix.lstrip(".").lower() not in io.PICTURE_FORMATS:
        raise DataError(f"--out {args.out}: the picture must be one of {io.PICTURE_FORMATS}")
    if args.out:  # before grounding: a bad output place fails fast
        io.check_writable_file(args.out, "--out")
    if not args.no_cache:
        io.check_writable_folder(args.cache, "--cache")
    if args.labelstudio and not args.out_dir:
        raise DataError(f"--labelstudio writes OUT/{LABELSTUDIO_FILE}: pass --out-dir OUT too")
    if args.out_dir is None and len(sources) == 1 and _one_file(sources[0]):
        _predict_one(args, Path(sources[0]), phrases)
        return
    if args.out:
        raise DataError("--out names the picture of one image; with several, pass --out-dir")
    paths = io.find_images(sources)  # before the model: a source naming nothing fails fast
    if args.out_dir:
        io.check_writable_folder(args.out_dir, "--out-dir")
    if args.labelstudio:
        _check_inside(paths, args.labelstudio)
    check_device_spec(args.device, "--device")
    _predict_many(args, paths, phrases)


def _check_inside(paths: list[Path], root: Path) -> None:
    """:class:`DataError` naming the first image that Label Studio could not serve from the
    local-files document root ``root``."""
    root = root.resolve()
    for path in paths:
        if not path.resolve().is_relative_to(root):
            raise DataError(
                f"--labelstudio {root}: {path} is not inside it (Label Studio serves local files "
                "from under its LOCAL_FILES_DOCUMENT_ROOT only)"
            )


def _one_file(source: str) -> bool:
    """Whether ``source`` names one image file (today's single-image predict), not a folder,
    a glob or a list."""
    path = Path(source)
    if source.startswith("@") or path.is_dir():
        return False
    return path.exists() or not set("*?[") & set(source)


def _load(args: argparse.Namespace) -> Grounder:
    """The grounder ``--model`` names (the packaged one by default) on ``--device``, named on
    stderr: every answer says which model gave it."""
    model = _model_or_pretrained(args.model)
    if is_mlflow_uri(model):  # a store copied or moved with its checkout reads its own artifacts
        from grounding import tracking
        from grounding.config import repo_root, tracking_uri

        tracking.relocate_store(tracking_uri(repo_root()))
    grounder = load_grounder(model, args.device, where="--device")
    print(f"model: {grounder.describe()}", file=sys.stderr)
    return grounder


def _warn_if_only_the_sample(grounder: Grounder, images: Iterable[Path]) -> None:
    """A model trained on the synthetic sample knows only its shapes: say so on stderr when it
    is asked about another image."""
    synthetic = grounder.trained_on is not None and grounder.trained_on.synthetic
    if synthetic and not all(from_sample(image) for image in images):
        print(
            f"warning: this model only knows the synthetic shapes of {SAMPLE_ROOT} "
            "(coloured circles, squares, ...), and not every image is one of them; for real "
            "photos use the packaged grounder trained on Flickr30k Entities: --model "
            f"{PRETRAINED_NAME}",
            file=sys.stderr,
        )


def _predict_one(args: argparse.Namespace, path: Path, phrases: list[str]) -> None:
    """One image: its record (as in a batch) as indented JSON on stdout, with the seconds taken;
    the picture in ``--out``."""
    from grounding.config import check_device_spec
    from grounding.inference.batch import ImageGrounding, with_threshold
    from grounding.inference.grounder import check_size

    image = io.read_image(path)  # before the model: a bad image fails fast
    check_size(image.size, str(path))  # a 1x1 or 1x50000 image too
    check_device_spec(args.device, "--device")  # before the model: a bad name fails fast
    started = time.perf_counter()
    grounder = _load(args)
    loaded = time.perf_counter()
    _warn_if_only_the_sample(grounder, [path])
    proposals = grounder.proposer(None if args.no_cache else io.ProposalCache(args.cache))
    with grounder.scorer.out_of_memory_hint(OUT_OF_MEMORY_ADVICE):
        found = grounder.ground(image, phrases, top_k=args.top_k, proposals=proposals)
    threshold = grounder.threshold if args.threshold is None else args.threshold
    answer = ImageGrounding(path, image.size, threshold, with_threshold(found, threshold), image)
    result = answer.record(grounder.model_info())
    result["seconds"] = {
        "load_model": round(loaded - started, 3),
        "ground": round(time.perf_counter() - loaded, 3),
    }
    if args.out:
        from grounding.inference.drawing import groundings

        io.write_picture(groundings(image, answer.groundings), args.out)
        result["out"] = str(args.out)
    json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
    print()


def _predict_many(args: argparse.Namespace, paths: list[Path], phrases: list[str]) -> None:
    """Several images through one loaded grounder: a JSON Lines record per image to stdout, or
    to ``--out-dir``/predictions.jsonl with each image's picture beside it; a progress bar,
    each skipped image and the counts on stderr. Fails only when no image was grounded."""
    from tqdm import tqdm

    from grounding.inference.batch import ImageGrounding, ground_images, picture_names

    grounder = _load(args)
    _warn_if_only_the_sample(grounder, paths)
    proposals = grounder.proposer(None if args.no_cache else io.ProposalCache(args.cache))
    names = picture_names(paths)
    results = ground_images(
        grounder,
        paths,
        phrases,
        read=io.read_image,
        top_k=args.top_k,
        threshold=args.threshold,
        proposals=proposals,
    )
    grounded, skipped = 0, 0
    tasks = []  # for Label Studio: the answers as pre-annotations to review
    with contextlib.ExitStack() as stack:
        if args.out_dir:
            records_path = args.out_dir / PREDICTIONS_FILE
            args.out_dir.mkdir(parents=True, exist_ok=True)
            # line by line, flushed: a long batch that is stopped keeps what it has done
            records = stack.enter_context(records_path.open("w", encoding="utf-8"))
        else:
            records = sys.stdout
        bar = stack.enter_context(tqdm(total=len(paths), unit="image", file=sys.stderr))
        stack.enter_context(grounder.scorer.out_of_memory_hint(OUT_OF_MEMORY_ADVICE))
        for result in results:
            bar.update()
            if not isinstance(result, ImageGrounding):
                skipped += 1
                bar.write(f"skipped: {result.error}", file=sys.stderr)
                continue
            grounded += 1
            record = result.record(grounder.model_info())
            if args.out_dir:
                from grounding.inference.drawing import groundings

                picture = args.out_dir / names[result.path]
                io.write_picture(groundings(result.image, result.groundings), picture)
                record["picture"] = str(picture)
            records.write(json.dumps(record, ensure_ascii=False) + "\n")
            records.flush()
            if args.labelstudio:
                version = grounder.source or "grounding predict"
                tasks.append(result.labelstudio_task(args.labelstudio, model_version=version))
    if args.labelstudio:
        io.write_json(tasks, args.out_dir / LABELSTUDIO_FILE)
        print(
            f"{args.out_dir / LABELSTUDIO_FILE}: {len(tasks)} Label Studio tasks", file=sys.stderr
        )
    where = f"; records in {args.out_dir / PREDICTIONS_FILE}" if args.out_dir else ""
    print(f"grounded {grounded} of {len(paths)} images, skipped {skipped}{where}", file=sys.stderr)
    if not grounded:
        raise DataError(f"no image could be grounded ({skipped} skipped)")


def _demo(args: argparse.Namespace) -> None:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # before the model: fail fast
        raise ConfigError(
            "grounding demo needs gradio, which is not installed; it pins an older Pillow, so "
            "install it in its own environment (docs/inference.md: The web demo)"
        )
    from grounding.config import check_device_spec
    from grounding.inference.demo import build_demo, launch

    if not args.no_cache:
        io.check_writable_folder(args.cache, "--cache")
    check_device_spec(args.device, "--device")
    grounder = _load(args)
    proposals = grounder.proposer(None if args.no_cache else io.ProposalCache(args.cache))
    model = grounder.source or _model_or_pretrained(args.model)
    print(f"grounding demo of {model} at http://{args.host}:{args.port}", file=sys.stderr)
    launch(build_demo(grounder, model, proposals=proposals), host=args.host, port=args.port)


def _read_phrases(path: Path) -> list[str]:
    """One phrase per line (UTF-8, a byte order mark ignored; lines end at ``\n``, ``\r\n`` or
    ``\r``, not at U+2028 or the other separators ``str.splitlines`` knows, which are part of
    a phrase); blank lines are skipped."""
    from grounding.data.formats.flickr30k import text_lines

    if path.exists() and not path.is_file():
        raise DataError(f"{path}: cannot read phrases (not a regular file)")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read phrases ({error.strerror})") from None
    return [line for line in text_lines(data, str(path)) if line.strip()]


def _convert(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from grounding.config import load_params

    if not args.params.is_file():
        raise ConfigError(f"{args.params}: no params file (it names each split's file)")
    data = load_params(args.params).data
    source = dataset_format(args.source, data.formats)
    target = dataset_format(args.target, data.formats)
    if target.write is None:  # argparse offers only writable formats
        raise ConfigError(f"--to {target.name}: the format is read-only")
    _check_output(args.output, target.files.values(), force=args.force)
    reader = source.open(
        args.input,
        splits=args.input / data.splits,
        files=source.files,
        skip_bad_files=args.skip_bad_files,
    )
    written = target.write(tqdm(reader, desc=f"{source.name} -> {target.name}", unit="image"))
    files = target.files
    for split, count in written.images.items():
        if count and split not in files:
            raise ConfigError(
                f"data.{target.name}.{split} is null in {args.params}, but {count} images are "
                f"in the {split} split"
            )
    io.write_all(
        {str(name): written.texts[split] for split, name in files.items()}, args.output, "OUT"
    )
    for split, name in files.items():
        print(f"{args.output / name}: {written.images[split]:,} images")
    left_out = dict(written.left_out)
    if reader.skipped:
        left_out["records that break the format (--skip-bad-files)"] = len(reader.skipped)
    for reason, count in left_out.items():
        print(f"left out: {count:,} {reason}")


def _check_output(folder: Path, names: Iterable[Path], *, force: bool) -> None:
    """Before converting: :class:`DataError` if the files ``names`` cannot all be written in
    ``folder``, or if some exist and ``force`` is not set."""
    io.check_writable_folder(folder, "OUT")
    paths = [folder / name for name in names]
    for path in paths:
        io.check_writable_file(path, "OUT")
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise DataError(
            f"OUT {folder}: {', '.join(existing)} exist(s); pass --force to replace "
            f"{'it' if len(existing) == 1 else 'them'}"
        )


def _export(args: argparse.Namespace) -> None:
    use_numerics(args.numerics, "--numerics")  # first: before anything loads torch
    started = time.perf_counter()
    grounder = load_grounder(args.model, "cpu", where="--device")
    print(f"model: {grounder.describe()}", file=sys.stderr)
    written = EXPORT_FORMATS.build(args.format)(grounder, args.out)
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
        "Flickr30k images (non-commercial research terms; docs/serving.md: The packaged grounder)",
        file=sys.stderr,
    )
    return PRETRAINED_NAME


def _whole_number(text: str, low: int, high: int) -> int:
    """``text`` as a whole number in ``low..high``, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
    return value


def _top_k(text: str) -> int:
    """An argparse type: a whole number in ``1..MAX_TOP_K``."""
    from grounding.inference.grounder import MAX_TOP_K

    return _whole_number(text, 1, MAX_TOP_K)


def _port(text: str) -> int:
    """An argparse type: a TCP port."""
    return _whole_number(text, 1, 65535)


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
        default=SAMPLE_ROOT,
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
    predict.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files, folders (their images), globs ('photos/*.jpg', quoted) or @list.txt "
        "(one of these a line)",
    )
    predict.add_argument(
        "--list",
        type=Path,
        action="append",
        default=[],
        help="a text file of images, folders or globs, one a line (repeatable; = @FILE)",
    )
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
        help=f"{PRETRAINED_NAME} (the packaged grounder, trained on real Flickr30k photos), a "
        "grounder weights file, this project's pyfunc model folder, an MLflow URI "
        "(runs:/<run id>/grounder, models:/phrase-grounder/<version>), or the folder of "
        "`grounding export --format onnx` (fastest to start), or hf:<model id or folder> "
        "(a Hugging Face CLIP or SigLIP model grounding with no training); default "
        f"{TRAINED_GROUNDER}, or {PRETRAINED_NAME} when that does not exist",
    )
    predict.add_argument(
        "--top-k", type=_top_k, default=1, help="boxes per phrase, 1 to 1000 (default 1)"
    )
    predict.add_argument(
        "--out",
        type=Path,
        help="one image: also draw its labelled boxes into this picture (.png, .jpg, .webp)",
    )
    predict.add_argument(
        "--out-dir",
        type=Path,
        help=f"write {PREDICTIONS_FILE} (a JSON record per image) and each image's picture "
        "here, instead of JSON on stdout",
    )
    predict.add_argument(
        "--labelstudio",
        type=Path,
        metavar="ROOT",
        help=f"with --out-dir, also write {LABELSTUDIO_FILE}: a Label Studio task per image, "
        "its boxes above the threshold as pre-annotations to review (import it into a project "
        "with the shipped labelling config; ROOT is Label Studio's LOCAL_FILES_DOCUMENT_ROOT, "
        "which must hold the images: docs/annotation.md)",
    )
    predict.add_argument(
        "--threshold",
        type=float,
        help="score from which a box counts as found (above_threshold); default: the "
        "grounder's, chosen on validation by the sweep",
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

    demo = commands.add_parser(
        "demo",
        help="a local web page to try a grounder: upload a photo, type phrases, see the boxes",
        description=(
            "Serve a Gradio page on this machine (127.0.0.1 by default): upload a photo, type "
            "phrases one a line, move the threshold, see the labelled boxes and the record "
            "that `grounding predict` would write. Needs gradio (docs/inference.md)."
        ),
    )
    demo.add_argument("--model", help="the grounder, as `predict --model` takes it")
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default %(default)s: this machine only)",
    )
    demo.add_argument("--port", type=_port, default=7860, help="default %(default)s")
    demo.add_argument(
        "--cache",
        type=Path,
        default=_default_cache(),
        help="folder of cached candidate boxes (default %(default)s)",
    )
    demo.add_argument("--no-cache", action="store_true", help="always compute the boxes")
    demo.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)"
    )
    demo.set_defaults(handler=_demo)

    convert = commands.add_parser(
        "convert",
        help="convert a dataset's annotations to another format (odvg, mdetr, labelstudio)",
        description=(
            "Read the annotations of the dataset at IN in one format and write them to OUT in "
            "another, each split to the file that params.yaml names for it (data.odvg, "
            "data.mdetr, data.labelstudio), so that the pipeline reads OUT with -S "
            "data.format=... -S data.root=OUT. Images are not copied: keep them in data.images "
            "under OUT. labelstudio writes tasks whose predictions a reviewer corrects in Label "
            "Studio (docs/annotation.md). What the target format cannot hold is counted on the "
            "last lines. Every file is written, or none: existing files are replaced only with "
            "--force."
        ),
    )
    convert.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=FORMATS.plain_names(),
        help="the format of IN",
    )
    convert.add_argument(
        "--to",
        dest="target",
        required=True,
        choices=writable_formats(),
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
        "--force",
        action="store_true",
        help="replace the files already in OUT (without it, existing files stop the command)",
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
        "--format", choices=EXPORT_FORMATS.plain_names(), default="onnx", help="default %(default)s"
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
