"""`grounding demo`: the page's work without Gradio (stand-in models), and the real page in
headless Chromium through Playwright (the packaged grounder; one server for the session)."""

from __future__ import annotations

import io as bytes_io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import stand_ins
from conftest import REPO_ROOT, png_header
from PIL import Image, ImageColor

from grounding.errors import DataError
from grounding.inference.demo import answer
from grounding.inference.drawing import PHRASE_COLOURS

CHROMIUM = Path("/usr/bin/chromium")
#: A Python with gradio (the lock has it; a library install may keep it in an environment of its
#: own, since gradio pins an older Pillow: name that environment's python here).
DEMO_PYTHON = os.environ.get("GROUNDING_DEMO_PYTHON", sys.executable)


def test_the_answer_is_the_picture_and_the_record_at_the_chosen_threshold(tmp_path: Path) -> None:
    upload = tmp_path / "shapes.png"
    stand_ins.two_shapes().save(upload)
    picture, record = answer(
        stand_ins.grounder(), "stand-in", str(upload), "a red box\n\n a blue box \n", 0.0
    )
    assert picture.size == (240, 160)
    assert record["model"] == "stand-in" and record["image"] == "shapes.png"
    assert record["threshold"] == 0.0
    assert [p["phrase"] for p in record["phrases"]] == ["a red box", "a blue box"]
    assert all(p["boxes"][0]["above_threshold"] for p in record["phrases"])
    assert len(np.argwhere((np.asarray(picture) == ImageColor.getrgb(PHRASE_COLOURS[1])).all(-1)))


@pytest.mark.parametrize(
    "upload, phrases, threshold, message",
    [
        (None, "a dog", 0.5, "upload a photo first"),
        ("shapes.png", "\n \n", 0.5, "no phrase given"),
        ("shapes.png", "a dog", 2.0, "threshold 2.0 is not between 0 and 1"),
        ("huge.png", "a dog", 0.5, "huge.png: image is 9000x7000 = 63,000,000 pixels; at most"),
        ("notes.png", "a dog", 0.5, "notes.png: unreadable image"),
    ],
)
def test_mistakes_are_one_message_for_the_page(
    tmp_path: Path, upload: str | None, phrases: str, threshold: float, message: str
) -> None:
    stand_ins.two_shapes().save(tmp_path / "shapes.png")
    (tmp_path / "huge.png").write_bytes(png_header(9000, 7000))  # only the header: not decoded
    (tmp_path / "notes.png").write_text("not a picture")
    path = str(tmp_path / upload) if upload else None
    with pytest.raises(DataError) as error:
        answer(stand_ins.grounder(), "m", path, phrases, threshold)
    assert str(error.value).startswith(message)


# --- the page in a browser -----------------------------------------------------------------


def _has_gradio(python: str) -> bool:
    found = subprocess.run([python, "-c", "import gradio"], capture_output=True, check=False)
    return found.returncode == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `grounding demo` of the packaged grounder for the test session, on 127.0.0.1."""
    if not _has_gradio(DEMO_PYTHON):
        pytest.skip(f"gradio is not importable by {DEMO_PYTHON} (set GROUNDING_DEMO_PYTHON)")
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "GRADIO_ANALYTICS_ENABLED": "False"}
    model = REPO_ROOT / "src/grounding/pretrained/flickr30k.safetensors"
    command = ["grounding.cli", "demo", "--port", str(port), "--no-cache", "--model", str(model)]
    with log.open("wb") as output:
        server = subprocess.Popen(
            [DEMO_PYTHON, "-m", *command],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the demo did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_the_page_grounds_an_uploaded_photo_and_refuses_one_over_the_pixel_cap(
    demo_url: str, tmp_path: Path
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    photo, huge = tmp_path / "shapes.png", tmp_path / "huge.png"
    stand_ins.two_shapes().save(photo)
    huge.write_bytes(png_header(9000, 7000))
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(demo_url, wait_until="domcontentloaded")
        page.locator("input[type=file]").first.set_input_files(str(photo))
        page.locator("#phrases textarea").fill("a red box\na blue box")
        page.locator("#ground").click()
        shown = page.locator("#boxes img").first
        shown.wait_for(timeout=120_000)
        with urllib.request.urlopen(str(shown.get_attribute("src")), timeout=30) as response:
            picture = Image.open(bytes_io.BytesIO(response.read())).convert("RGB")
        page.get_by_text('"phrase": "a blue box"').first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "demo.png"))
        # the picture came back with a label in each phrase's colour
        pixels = np.asarray(picture)
        for colour in PHRASE_COLOURS[:2]:
            assert (pixels == ImageColor.getrgb(colour)).all(-1).sum() > 100, colour
        page.goto(demo_url, wait_until="domcontentloaded")
        page.locator("input[type=file]").first.set_input_files(str(huge))
        page.locator("#phrases textarea").fill("a red box")
        page.locator("#ground").click()
        page.get_by_text("accepted (shrink it first)", exact=False).first.wait_for(timeout=60_000)
        browser.close()
