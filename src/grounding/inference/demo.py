"""``grounding demo``: a local web page (Gradio) to try a grounder: upload a photo, type
phrases (one a line), move the threshold, see the labelled boxes and the record.

:func:`answer` is the page's work without Gradio (tested directly); :func:`build_demo` wires it
into a Gradio ``Blocks`` app. Gradio is an optional dependency (the ``demo`` extra): it pins an
older Pillow than the project's other packages accept, so it is installed on its own (README).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from grounding import io
from grounding.candidates import Propose
from grounding.errors import DataError
from grounding.inference.batch import ImageGrounding, check_threshold, with_threshold
from grounding.inference.drawing import groundings
from grounding.inference.grounder import Grounder, check_phrases

if TYPE_CHECKING:
    import gradio

#: The page's title.
TITLE = "Phrase grounding"
#: The address the demo listens on unless told otherwise: this machine only.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def answer(
    grounder: Grounder,
    model: str,
    upload: str | None,
    phrases_text: str,
    threshold: float,
    *,
    proposals: Propose | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """The picture and the JSON record (as ``grounding predict`` writes it) of the phrases
    ``phrases_text`` (one a line; blank lines skipped) in the uploaded file ``upload`` at
    ``threshold``. :class:`DataError` with a message for the page when there is no upload or
    phrase, or the image is unreadable, too small or over the pixel cap (from the file's header,
    before decoding: the same check as ``grounding predict``)."""
    if not upload:
        raise DataError("upload a photo first")
    path = Path(upload)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path.name}: cannot read the upload ({error})") from None
    image = io.decode_image(data, path.name)
    phrases = check_phrases([line for line in phrases_text.splitlines() if line.strip()])
    threshold = check_threshold(float(threshold))
    found = grounder.ground(image, phrases, proposals=proposals)
    result = ImageGrounding(
        Path(path.name), image.size, threshold, with_threshold(found, threshold), image
    )
    return groundings(image, result.groundings), result.record(model)


def build_demo(
    grounder: Grounder, model: str, *, proposals: Propose | None = None
) -> gradio.Blocks:
    """The Gradio app of ``grounder`` (named ``model`` in the records): a photo upload, a
    phrases box, a threshold slider (at the grounder's threshold) and a button; the labelled
    picture and the record come back, and a mistake (no photo, an image over the pixel cap)
    shows as the page's error message."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def run(upload: str | None, phrases_text: str, threshold: float) -> tuple[Any, Any]:
        try:
            return answer(grounder, model, upload, phrases_text, threshold, proposals=proposals)
        except DataError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nModel: `{model}`. One phrase a line.")
        with gr.Row():
            with gr.Column():
                upload = gr.Image(type="filepath", sources=["upload"], label="Photo")
                phrases = gr.Textbox(
                    lines=4, label="Phrases", placeholder="a dog\nthe red ball", elem_id="phrases"
                )
                threshold = gr.Slider(
                    0.0, 1.0, value=round(grounder.threshold, 3), step=0.01, label="Threshold"
                )
                button = gr.Button("Ground", variant="primary", elem_id="ground")
            with gr.Column():
                picture = gr.Image(type="pil", label="Boxes", format="png", elem_id="boxes")
                record = gr.JSON(label="Record")
        inputs = [upload, phrases, threshold]
        button.click(run, inputs, [picture, record])
        threshold.release(run, inputs, [picture, record])
    return demo


def launch(demo: gradio.Blocks, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve ``demo`` at ``http://host:port`` until interrupted: no share link, no analytics,
    one grounding at a time (the model is loaded once and shared)."""
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, show_error=True, quiet=True
    )
