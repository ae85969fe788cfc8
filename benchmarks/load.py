"""The served grounder under load: `mlflow models serve` on loopback, several clients at once.

Saves the grounder (``--model``, a weights file) as the pyfunc model the pipeline registers,
serves it with ``mlflow models serve --env-manager local`` on a free loopback port, sends one
warm-up request and a warm-up round at full concurrency, then ``--requests`` requests from
``--concurrency`` clients at once, each one image (base64) x two phrases. Prints the
latency's median and 95th percentile, the requests per second, the failed requests, and the
server's resident memory (all its processes) before the load, at its peak and after: memory
that grows with the requests is a leak. ``--out`` also writes the figures as JSON.

Then ``--bursts`` bursts (default 2) of ``--burst`` requests at once (default 8), each one
PNG of ``--burst-side`` x ``--burst-side`` pixels (default 7700: 59.3 Mpx, just under the
60 Mpx cap, about 230 KB), and the server's memory at each burst's peak and once it has
settled (5 s after): with requests grounded ``GROUNDING_CONCURRENCY`` at a time and images
decoded at the size the models need, the peak stays under the ceiling the README states and a
second burst does not go higher than the first.

    python -m benchmarks.load --model models/grounder.safetensors --requests 200
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import REPO, SHARED_DATA

PHRASES = ("a man", "the dog on the left")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=REPO / "models" / "grounder.safetensors", help="grounder"
    )
    parser.add_argument("--image", type=Path, help="the image (default: the first real one)")
    parser.add_argument("--requests", type=int, default=200, help="requests to send")
    parser.add_argument("--concurrency", type=int, default=4, help="clients at once")
    parser.add_argument("--burst", type=int, default=8, help="huge images sent at once")
    parser.add_argument("--bursts", type=int, default=2, help="bursts to send (0: none)")
    parser.add_argument("--burst-side", type=int, default=7700, help="side of the huge images")
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    return parser.parse_args(argv)


def huge_png(side: int) -> bytes:
    """A ``side`` x ``side`` PNG of a few shapes: large in pixels, small as a file (about
    230 KB at 7700)."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (120, 160, 200))
    draw = ImageDraw.Draw(image)
    for start in range(0, side, max(1, side // 11)):
        draw.rectangle([start, start, start + side // 15, start + side // 8], fill=(200, 30, 40))
        draw.ellipse(
            [side - start - side // 12, start, side - start, start + side // 12], fill=(20, 180, 40)
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bursts(url: str, body: bytes, size: int, rounds: int, pid: int) -> dict[str, float]:
    """``rounds`` bursts of ``size`` requests at once; each one's errors, peak and settled
    memory (MB)."""
    figures: dict[str, float] = {}
    for round_ in range(1, rounds + 1):
        burst = load(url, body, size, size, pid)
        time.sleep(5)
        figures[f"burst{round_}_errors"] = burst["errors"]
        figures[f"burst{round_}_seconds"] = burst["wall_s"]
        figures[f"burst{round_}_rss_peak_mb"] = burst["rss_peak_mb"]
        figures[f"burst{round_}_rss_settled_mb"] = tree_rss_mb(pid)
    return figures


def default_image() -> Path:
    """The first real Flickr30k image beside the project, else the sample's first image."""
    for folder in (SHARED_DATA / "images", REPO / "data" / "sample" / "images"):
        images = sorted(folder.glob("*.jpg"))
        if images:
            return images[0]
    raise SystemExit("no image found: give --image")


def save_pyfunc(grounder: Path, folder: Path) -> Path:
    """The grounder as the pyfunc model (from code) that the report stage logs."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from grounding.inference import serving

    model = folder / "model"
    mlflow.pyfunc.save_model(
        str(model),
        python_model=str(Path(serving.__file__).with_name("mlflow_model.py")),
        artifacts={"grounder": str(grounder)},
        signature=serving.SIGNATURE,
        pip_requirements=["grounding"],
    )
    return model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants, in MB (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def post(url: str, body: bytes) -> tuple[int, float]:
    """The status and seconds of one request."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    return status, time.perf_counter() - start


def wait_for(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5):
                return
        except OSError:
            if server.poll() is not None:
                raise SystemExit("the server exited") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not come up in {timeout:.0f} s") from None
            time.sleep(1)


def load(url: str, body: bytes, requests: int, concurrency: int, pid: int) -> dict[str, float]:
    """Send ``requests`` requests from ``concurrency`` threads; the figures."""
    peak = [tree_rss_mb(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak.append(tree_rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: post(f"{url}/invocations", body), range(requests)))
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    seconds = sorted(s for _, s in results)
    return {
        "p50_s": statistics.median(seconds),
        "p95_s": seconds[min(len(seconds) - 1, round(0.95 * (len(seconds) - 1)))],
        "requests_per_s": requests / wall,
        "errors": sum(status != 200 for status, _ in results),
        "wall_s": wall,
        "rss_peak_mb": max(peak),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: no grounder; train one with `dvc repro`")
    if args.requests < 1 or args.concurrency < 1 or args.burst < 1 or args.bursts < 0:
        raise SystemExit("--requests, --concurrency and --burst must be >= 1, --bursts >= 0")
    from grounding.inference.serving import (
        CONCURRENCY_VARIABLE,
        DEFAULT_CONCURRENCY,
        MEMORY_PER_GROUNDING_MB,
        encode_image,
    )

    image = args.image or default_image()
    data = [[encode_image(image.read_bytes()), phrase] for phrase in PHRASES]
    body = json.dumps({"dataframe_split": {"columns": ["image", "phrase"], "data": data}}).encode()
    with tempfile.TemporaryDirectory(prefix="load-") as work:
        model = save_pyfunc(args.model.resolve(), Path(work))
        port = free_port()
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model)]
        command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
        server = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(url, server)
            status, first = post(f"{url}/invocations", body)  # warm-up: lazy imports, caches
            if status != 200:
                raise SystemExit(f"the warm-up request failed with HTTP {status}")
            # a first round at full concurrency: each server thread's buffers, once
            load(url, body, 2 * args.concurrency, args.concurrency, server.pid)
            before = tree_rss_mb(server.pid)
            figures = load(url, body, args.requests, args.concurrency, server.pid)
            after = tree_rss_mb(server.pid)
            if args.bursts:
                data = [[encode_image(huge_png(args.burst_side)), PHRASES[0]]]
                huge = {"dataframe_split": {"columns": ["image", "phrase"], "data": data}}
                figures |= bursts(
                    url, json.dumps(huge).encode(), args.burst, args.bursts, server.pid
                )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    slots = int(os.environ.get(CONCURRENCY_VARIABLE, DEFAULT_CONCURRENCY))
    ceiling = before + slots * MEMORY_PER_GROUNDING_MB
    peaks = [value for name, value in figures.items() if name.endswith("_rss_peak_mb")]
    results: dict[str, float | int | str] = {
        "image": image.name,
        "phrases": len(PHRASES),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "grounding_concurrency": slots,
        "first_request_s": first,
        **figures,
        "rss_before_mb": before,
        "rss_after_mb": after,
        "rss_ceiling_mb": ceiling,
        "ceiling_holds": str(max(peaks) <= ceiling),
    }
    for name, value in results.items():
        print(f"{name:18} {value:.3f}" if isinstance(value, float) else f"{name:18} {value}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
