"""Benchmark the pipeline's cost against the number of images: per-stage wall time, peak
memory and output size at several N, for each candidate setting, and the extrapolation to the
full Flickr30k Entities (31,783 images).

    python -m benchmarks.scale --n 500 2000 8000 --candidates annotated selective_search

Each dataset is N real annotation files (boxes and captions) from
``../shared/flickr30k_entities/annotations.zip`` with the official split lists cut to them (in
their real proportions: N * 1000 / 31,783 validation and test images each), and placeholder
pixels: a JPEG of one colour at the annotated size per image. Two stages are stood in for, so
that no backbone runs on placeholder pixels and no selective search runs on them:

- proposals: 100 seeded random boxes per image (at least 16 px a side) are put in the proposal
  cache under the image's real cache key, so the pair stage reads them as it would read the
  boxes selective search made (the real search costs about 0.5 s per image);
- features: region features of the real shape (float32, 1,287 per region: EfficientNet-Lite0's
  1,280 plus the box geometry) and phrase embeddings (384, unit length) are written seeded
  random; the real extraction costs about 20 images/s with annotated candidates.

Every other stage runs as DVC runs it (its ``cmd`` from ``dvc.yaml``, in a subprocess), with
``train.epochs`` 1 (the default 30 costs 30 times the epoch) and the report's MLflow logging
off. For each stage: wall time, the peak resident memory of the process (``ru_maxrss`` from
``wait4``: what the kernel counted, memory-mapped feature pages included) and the peak of its
anonymous memory (``RssAnon``, polled: the heap, without the file pages of the memory-mapped
features that the kernel can drop at will), and the size of what it wrote. Writes
``reports/scale.json``, ``reports/scale.md`` and ``reports/scale.png``.

``--memory-limit MB`` (root) runs each stage in a memory cgroup capped at MB, its files'
cached pages dropped first so that what it reads counts against its own cap: the check that a
stage runs within a memory budget, not only that its heap is small.

    python -m benchmarks.scale --n 31783 --candidates selective_search --memory-limit 8192
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml

from benchmarks import REPO, SHARED_DATA

FULL = 31_783
STAGES = ("parse", "pair", "split", "train", "sweep", "report")
REGION_DIM, PHRASE_DIM = 1287, 384
PROPOSALS = 100
#: What each stage writes, for its output size (paths relative to the work folder).
OUTPUTS = {
    "parse": ["data/parsed"],
    "pair": ["data/pairs"],
    "split": ["data/split"],
    "features": ["data/features"],
    "train": ["models/head.safetensors"],
    "sweep": ["models/grounder.safetensors"],
    "report": ["reports/predictions.parquet", "reports/plots", "reports/gallery.png"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[500, 2000, 8000], help="images")
    parser.add_argument(
        "--candidates", nargs="+", default=["annotated", "selective_search"], help="generators"
    )
    parser.add_argument("--epochs", type=int, default=1, help="train.epochs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-benchmark"))
    parser.add_argument("--annotations", type=Path, default=SHARED_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "scale")
    parser.add_argument("--keep", action="store_true", help="keep each run's work folder")
    parser.add_argument(
        "--memory-limit",
        type=int,
        metavar="MB",
        help="run each stage in a memory cgroup capped at MB (root; see MemoryCap)",
    )
    parser.add_argument(
        "--until", choices=STAGES, default=STAGES[-1], help="run the stages up to this one"
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        help="only merge these runs' JSON files into --out (runs made apart, e.g. at once)",
    )
    return parser.parse_args(argv)


# --- the dataset ------------------------------------------------------------------------------


def chosen_images(annotations: Path, n: int) -> dict[str, list[str]]:
    """``n`` image ids from the official split lists, each list cut in proportion (seeded)."""
    lists = {
        name: (annotations / f"{name}.txt").read_text().split() for name in ("train", "val", "test")
    }
    total = sum(len(ids) for ids in lists.values())
    rng = np.random.default_rng(0)
    chosen = {}
    for name in ("val", "test"):
        count = max(1, round(n * len(lists[name]) / total))
        chosen[name] = sorted(rng.choice(lists[name], size=count, replace=False).tolist())
    count = n - len(chosen["val"]) - len(chosen["test"])
    chosen["train"] = sorted(rng.choice(lists["train"], size=count, replace=False).tolist())
    return chosen


def make_dataset(annotations: Path, root: Path, n: int) -> int:
    """The dataset of ``n`` images at ``root``; returns the number of images."""
    from PIL import Image

    chosen = chosen_images(annotations, n)
    ids = sorted(i for split in chosen.values() for i in split)
    root.mkdir(parents=True)
    for name, split in chosen.items():
        (root / f"{name}.txt").write_text("".join(f"{i}\n" for i in split))
    images = root / "images"
    images.mkdir()
    with (
        zipfile.ZipFile(annotations / "annotations.zip") as source,
        zipfile.ZipFile(root / "annotations.zip", "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for image_id in ids:
            xml = source.read(f"Annotations/{image_id}.xml")
            target.writestr(f"Annotations/{image_id}.xml", xml)
            target.writestr(f"Sentences/{image_id}.txt", source.read(f"Sentences/{image_id}.txt"))
            width, height = _size(xml)
            colour = tuple(hashlib.sha256(image_id.encode()).digest()[:3])
            Image.new("RGB", (width, height), colour).save(images / f"{image_id}.jpg", quality=90)
    return len(ids)


def _size(xml: bytes) -> tuple[int, int]:
    from lxml import etree

    size = etree.fromstring(xml).find("size")
    return int(size.findtext("width")), int(size.findtext("height"))


def prefill_proposals(work: Path, params: dict) -> None:
    """100 seeded random boxes per image in the proposal cache, under the key the pair stage
    looks them up by (the image's pixels and the generator's settings)."""
    from grounding import io
    from grounding.candidates import SELECTIVE_SEARCH, cache_key, settings_of
    from grounding.config import params_from_dict

    checked = params_from_dict(params)
    settings = settings_of(SELECTIVE_SEARCH, checked.candidates)
    key = cache_key(SELECTIVE_SEARCH, settings)
    images = io.read_table(work / "data/parsed/images.parquet")
    images = images[images["has_file"]]
    load = io.ImageFolder(work / params["data"]["root"] / "images", images)
    cache = io.ProposalCache(work / params["paths"]["proposals"])
    for row in images.itertuples():
        rng = np.random.default_rng(int(hashlib.sha256(row.image_id.encode()).hexdigest()[:8], 16))
        w, h = float(row.width), float(row.height)
        x1 = rng.uniform(0, w - 16, PROPOSALS)
        y1 = rng.uniform(0, h - 16, PROPOSALS)
        x2 = np.minimum(x1 + 16 + rng.uniform(0, w, PROPOSALS) * 0.6, w)
        y2 = np.minimum(y1 + 16 + rng.uniform(0, h, PROPOSALS) * 0.6, h)
        boxes = np.stack([x1, y1, x2, y2], axis=1).round().astype(np.float32)
        cache.get(load(row.image_id), key, lambda boxes=boxes: boxes)


def placeholder_features(work: Path) -> None:
    """Region features and phrase embeddings of the real shape, seeded random, as the
    features stage writes them."""
    from grounding import io
    from grounding.modeling.text import distinct_phrases
    from grounding.schemas import FeaturesMeta

    out = work / "data/features"
    candidates = io.read_table(work / "data/pairs/candidates.parquet", ["region_id"])
    phrases = io.read_table(work / "data/pairs/phrases.parquet")
    texts, phrase_rows = distinct_phrases(phrases)
    rng = np.random.default_rng(0)
    shape = (len(candidates), REGION_DIM)
    with io.region_features_writer(out, shape) as regions:
        for start in range(0, shape[0], 65_536):
            stop = min(start + 65_536, shape[0])
            regions[start:stop] = rng.standard_normal((stop - start, REGION_DIM), np.float32)
    embeddings = rng.standard_normal((len(texts), PHRASE_DIM), np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    meta = FeaturesMeta(
        backbone="efficientnet-lite0",
        backbone_weights=None,
        text_encoder="all-minilm-l6-v2",
        image_size=448,
        context=False,
        region_dim=REGION_DIM,
        phrase_dim=PHRASE_DIM,
        regions=shape[0],
        phrases=len(phrase_rows),
    )
    io.write_features(out, embeddings, phrase_rows, meta)


# --- running and measuring a stage ----------------------------------------------------------


def stage_commands(params: dict) -> dict[str, str]:
    """Each stage's ``cmd`` from ``dvc.yaml``, its ``${...}`` filled from ``params``."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def fill(text: str) -> str:
        while "${" in text:
            start = text.index("${")
            stop = text.index("}", start)
            value: object = params
            for key in text[start + 2 : stop].split("."):
                value = value[key]  # type: ignore[index]
            text = text[:start] + str(value) + text[stop + 1 :]
        return text

    # the interpreter running this benchmark, not whichever `python` is first on PATH
    return {
        name: fill(stage["cmd"]).replace("python ", f"{sys.executable} ", 1)
        for name, stage in stages.items()
    }


def _memory_kb(pid: int) -> tuple[int, int]:
    """Anonymous and total resident memory (kB) of a process and its descendants."""
    import psutil

    anon = total = 0
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for process in processes:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return anon, total


def evict_page_cache(folder: Path) -> None:
    """Write back and drop the cached pages of every file under ``folder``: a page stays charged
    to the cgroup that first read or wrote it, so without this a capped stage would read the
    features the benchmark wrote without their pages counting against its cap."""
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


class MemoryCap:
    """A memory cgroup (v1 or v2) that one stage runs in, capped at ``limit_mb``: what the
    stage maps of its files counts too, and the kernel reclaims those pages at the cap; a stage
    whose heap needs more than the cap is killed (OOM) and the benchmark fails. Needs root and a
    writable cgroup file system (``/sys/fs/cgroup``)."""

    V1 = Path("/sys/fs/cgroup/memory")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, limit_mb: int, name: str) -> None:
        if (self.V1 / "cgroup.procs").exists():
            self.folder, limit, self.peak_file = (
                self.V1 / name,
                "memory.limit_in_bytes",
                ("memory.max_usage_in_bytes"),
            )
        elif (self.V2 / "cgroup.controllers").exists():
            self.folder, limit, self.peak_file = self.V2 / name, "memory.max", "memory.peak"
        else:
            raise SystemExit("--memory-limit needs a cgroup memory controller at /sys/fs/cgroup")
        try:
            self.folder.mkdir(exist_ok=True)
            (self.folder / limit).write_text(str(limit_mb * 2**20))
        except OSError as error:
            raise SystemExit(
                f"--memory-limit: cannot make a cgroup ({error}); run as root"
            ) from None
        self.limit_mb = limit_mb

    def wrap(self, command: str) -> str:
        """``command`` run by a shell that first moves itself into the group."""
        return f"echo $$ > {self.folder / 'cgroup.procs'} && exec {command}"

    def peak_mb(self) -> float:
        """The group's peak charge: heap plus the file pages it held."""
        return round(int((self.folder / self.peak_file).read_text()) / 2**20, 1)

    def remove(self) -> None:
        self.folder.rmdir()


def run_stage(
    command: str, cwd: Path, env: dict[str, str], log: Path, cap_mb: int | None = None
) -> dict[str, float]:
    """Run one stage (in a :class:`MemoryCap` of ``cap_mb`` when given); its wall time (s), the
    kernel's peak RSS, the polled peaks of its resident and anonymous memory and, capped, the
    group's peak (MB)."""
    cap = MemoryCap(cap_mb, f"grounding-scale-{os.getpid()}") if cap_mb else None
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            cap.wrap(command) if cap else command,
            shell=True,
            cwd=cwd,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        peak_anon = peak_rss = 0
        done = threading.Event()

        def poll() -> None:
            nonlocal peak_anon, peak_rss
            while not done.is_set():
                anon, rss = _memory_kb(process.pid)
                peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
                done.wait(0.2)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        poller.join()
    seconds = time.perf_counter() - start
    result = {
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "polled_rss_mb": round(peak_rss / 1024, 1),
        "peak_anon_mb": round(peak_anon / 1024, 1),
    }
    if cap:
        result |= {"cap_mb": cap.limit_mb, "cgroup_peak_mb": cap.peak_mb()}
        cap.remove()
    if process.returncode != 0:
        killed = " (killed: over the memory cap?)" if cap and process.returncode < 0 else ""
        raise RuntimeError(f"{command} failed{killed}; see {log}:\n{log.read_text()[-3000:]}")
    return result


def size_mb(work: Path, stage: str) -> float:
    total = 0
    for relative in OUTPUTS[stage]:
        path = work / relative
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
    return round(total / 2**20, 1)


def benchmark(n: int, candidates: str, args: argparse.Namespace) -> dict:
    """Every stage on a dataset of ``n`` images with ``candidates``."""
    work = args.work / f"{candidates}-{n}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in ("src", "stages", "dvc.yaml"):  # a copy: edits meanwhile do not leak in
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, work / name)
    images = make_dataset(args.annotations, work / "dataset", n)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["root"] = "dataset"
    params["pair"]["candidates"] = candidates
    params["train"]["epochs"] = args.epochs
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commands = stage_commands(params)
    commands["report"] += " --no-mlflow"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work / "src"), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    logs = work / "logs"
    logs.mkdir()
    results: dict[str, dict] = {}
    for stage in STAGES[: STAGES.index(args.until) + 1]:
        if stage == "pair" and candidates != "annotated":
            start = time.perf_counter()
            prefill_proposals(work, params)
            results["proposals (placeholder)"] = {"seconds": time.perf_counter() - start}
        if stage == "train":
            start = time.perf_counter()
            # in a process of its own: a child forked from a process holding the 16 GB mapped
            # file would start its own ru_maxrss at that process's RSS
            writer = multiprocessing.get_context("spawn").Process(
                target=placeholder_features, args=(work,)
            )
            writer.start()
            writer.join()
            if writer.exitcode != 0:
                raise RuntimeError(f"placeholder features failed (exit {writer.exitcode})")
            results["features (placeholder)"] = {
                "seconds": round(time.perf_counter() - start, 2),
                "output_mb": size_mb(work, "features"),
            }
        print(f"  {candidates} N={n}: {stage}", flush=True)
        if args.memory_limit:
            evict_page_cache(work)
        results[stage] = run_stage(
            commands[stage], work, env, logs / f"{stage}.log", args.memory_limit
        )
        results[stage]["output_mb"] = size_mb(work, stage)
    pair = json.loads((work / "reports/pair.json").read_text())
    outcome = {
        "n": images,
        "candidates": candidates,
        "pairs": pair["pairs"],
        "candidates_total": pair["candidates"],
        "phrases_paired": pair["phrases_paired"],
        "stages": results,
        "until": args.until,
    }
    if not args.keep:
        shutil.rmtree(work)
    return outcome


# --- the report -------------------------------------------------------------------------------


def extrapolate(runs: list[dict], candidates: str, stage: str, key: str) -> float | None:
    """The line through this setting's two largest runs, at N = 31,783: the marginal cost
    per image at the top of the measured range (a fit through all runs overstates memory
    that levels off, as a batch-bound stage's does)."""
    points = [
        (r["n"], r["stages"][stage][key])
        for r in runs
        if r["candidates"] == candidates and stage in r["stages"]
    ]
    if len(points) < 2:
        return None
    n, value = np.array(sorted(points)[-2:], dtype=np.float64).T
    slope, intercept = np.polyfit(n, value, 1)
    return float(intercept + slope * FULL)


def markdown(runs: list[dict], epochs: int) -> str:
    lines = [
        "# The pipeline's cost against the number of images",
        "",
        "`python -m benchmarks.scale` (see its docstring): real annotation files, placeholder",
        "pixels, placeholder proposals (100 per image) and features of the real shape;",
        f"train {epochs} epoch(s); wall times on a shared 2-core machine (other jobs running).",
        "Peak RSS is the kernel's `ru_maxrss` of the stage's process (memory-mapped feature",
        "pages included; Linux carries it across fork and exec, so runs made before the",
        "placeholder features were written in a process of their own also count the",
        "benchmark's mapped file there: an upper bound); polled RSS is the stage's resident",
        "memory, polled every 0.2 s (the file pages of the memory-mapped features included);",
        "peak anon is its anonymous memory (the heap), polled: the figure a stage needs. With",
        "`--memory-limit MB` each stage runs in a memory cgroup capped at MB (file pages",
        "count and are reclaimed at the cap; a heap over it is killed): the cgroup column is",
        "the group's peak charge against that cap. Seconds include each process's start-up.",
        "",
    ]
    for candidates in sorted({r["candidates"] for r in runs}):
        chosen = [r for r in runs if r["candidates"] == candidates]
        lines += [f"## {candidates}", ""]
        lines += [
            "| N images | pairs | stage | seconds | peak RSS MB | polled RSS MB | peak anon MB "
            "| cgroup peak / cap MB | output MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for run in chosen:
            for stage in [stage for stage in STAGES if stage in run["stages"]]:
                s = run["stages"][stage]
                polled = f"{s['polled_rss_mb']:,.0f}" if "polled_rss_mb" in s else "-"
                capped = f"{s['cgroup_peak_mb']:,.0f} / {s['cap_mb']:,}" if "cap_mb" in s else "-"
                lines.append(
                    f"| {run['n']:,} | {run['pairs']:,} | {stage} | {s['seconds']:.1f} | "
                    f"{s['peak_rss_mb']:,.0f} | {polled} | {s['peak_anon_mb']:,.0f} | "
                    f"{capped} | {s['output_mb']:,.1f} |"
                )
        if any(run["n"] >= FULL for run in chosen):
            lines += ["", f"N = {FULL:,} (the full set) is measured above.", ""]
            continue
        lines += [
            "",
            f"Peak anon at N = {FULL:,}, extrapolated through the two largest runs "
            "(times and RSS are too noisy here to extrapolate):",
            "",
        ]
        lines += ["| stage | peak anon MB |", "|---|---|"]
        for stage in STAGES:
            fit = extrapolate(runs, candidates, stage, "peak_anon_mb")
            if fit is not None:
                lines.append(f"| {stage} | {fit:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["candidates"] for r in runs})
    figure, axes = plt.subplots(2, len(settings), figsize=(6 * len(settings), 8), squeeze=False)
    for column, candidates in enumerate(settings):
        chosen = sorted((r for r in runs if r["candidates"] == candidates), key=lambda r: r["n"])
        for stage in STAGES:
            ran = [r for r in chosen if stage in r["stages"]]
            n = [r["n"] for r in ran]
            seconds = [r["stages"][stage]["seconds"] for r in ran]
            anon = [r["stages"][stage]["peak_anon_mb"] for r in ran]
            axes[0, column].plot(n, seconds, "o-", label=stage)
            axes[1, column].plot(n, anon, "o-", label=stage)
        axes[0, column].set(title=f"{candidates}: wall time", xlabel="images", ylabel="s")
        axes[1, column].set(
            title=f"{candidates}: peak anonymous memory", xlabel="images", ylabel="MB"
        )
        for axis in axes[:, column]:
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    runs = json.loads(json_path.read_text())["runs"] if json_path.exists() else []
    if args.merge:
        merged = [json.loads(path.read_text()) for path in args.merge]
        runs = sorted(
            (run for part in merged for run in part["runs"]),
            key=lambda r: (r["candidates"], r["n"]),
        )
        write_report(runs, merged[0]["epochs"], args.out)
        print(args.out.with_suffix(".md").read_text())
        return
    for candidates in args.candidates:
        for n in args.n:
            runs = [r for r in runs if (r["candidates"], r["n_asked"]) != (candidates, n)]
            print(f"{candidates}, {n} images", flush=True)
            run = benchmark(n, candidates, args)
            run["n_asked"] = n
            runs.append(run)
            runs.sort(key=lambda r: (r["candidates"], r["n"]))
            write_report(runs, args.epochs, args.out)
    print(args.out.with_suffix(".md").read_text())


def write_report(runs: list[dict], epochs: int, out: Path) -> None:
    """``out``.json, .md and .png of ``runs``."""
    out.with_suffix(".json").write_text(json.dumps({"epochs": epochs, "runs": runs}, indent=2))
    out.with_suffix(".md").write_text(markdown(runs, epochs))
    plot(runs, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
