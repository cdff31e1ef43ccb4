"""
DCLIP demo: text-to-image search over a gallery, caption ranking and zero-shot classification with a DCLIP student,
and the DCLIP teacher's regions with their region-to-word attention.

This module is the one copy of the app. `dclip demo [--model PATH_OR_HUB_ID] [--teacher PATH_OR_HUB_ID]
[--gallery DIR]` runs it in its own process; the Space folder `spaces_demo/` holds a two-line `app.py` that calls
[`main`] (its `requirements.txt` installs this package).

The server's own files are chosen by whoever starts it, on the command line (`--gallery DIR`); a visitor can upload
images, never name a file or folder of the server.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

# Set before gradio is imported: no usage reporting or version checks leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .gallery import (  # noqa: E402
    MAX_GALLERY_IMAGES,
    MAX_IMAGE_BYTES,
    GalleryCache,
    GalleryIndex,
    GalleryInputError,
    GalleryItem,
    folder_images,
    open_image,
    sample_photos,
    uploaded_images,
)
from .models import DemoModels, choose_models  # noqa: E402
from .region_view import region_view  # noqa: E402

MAX_TEXTS = 50
MAX_TEXT_CHARS = 200
DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_RESULTS = 6
logger = logging.getLogger("dclip.demo")


class DemoInputError(ValueError):
    """Text input the demo cannot use; the message is shown in the UI."""


def shows_errors(*empty_outputs):
    """Turn a handler's failures into a message in its status box (its last output), never a stack trace in the UI.

    Input errors are the user's to fix and are shown as they are; anything else is logged on the server and
    reported without details.
    """

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def run(*args):
            try:
                return handler(*args)
            except (GalleryInputError, DemoInputError) as error:
                return (*empty_outputs, f"⚠️ {error}")
            except Exception:
                logger.exception("demo handler %s failed", handler.__name__)
                return (*empty_outputs, "⚠️ Something went wrong on the server; the error is in its log.")

        return run

    return decorate


def parse_texts(text: str, what: str, separators: str) -> list[str]:
    """Split user text into entries (by `separators`), dropping blanks and duplicates; checks count and length."""
    for separator in separators[1:]:
        text = (text or "").replace(separator, separators[0])
    entries = list(dict.fromkeys(entry.strip() for entry in (text or "").split(separators[0]) if entry.strip()))
    if not entries:
        raise DemoInputError(f"type at least one {what}")
    if len(entries) > MAX_TEXTS:
        raise DemoInputError(f"{len(entries)} {what}s given; at most {MAX_TEXTS}")
    for entry in entries:
        if len(entry) > MAX_TEXT_CHARS:
            raise DemoInputError(f"{what} '{entry[:40]}...' is longer than {MAX_TEXT_CHARS} characters")
    return entries


def _image_from_upload(path: str | None):
    if not path:
        raise DemoInputError("upload an image first")
    return open_image(path, Path(path).name)


def _unique_headers(words: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    headers = []
    for word in words:
        seen[word] = seen.get(word, 0) + 1
        headers.append(word if seen[word] == 1 else f"{word} ({seen[word]})")
    return headers


class DemoApp:
    """The demo's shared state: models and gallery indexes (each gallery embedded once, for every session)."""

    def __init__(self, models: DemoModels, default_gallery: list[GalleryItem], thumbnail_dir: Path):
        self.models = models
        self.default_gallery = default_gallery
        self.galleries = GalleryCache(models.encode_gallery, thumbnail_dir)
        # Embedded now, at start-up, so that the first search does not wait for it.
        self.default_index = self.galleries.get(default_gallery) if default_gallery else None

    @staticmethod
    def gallery_status(index: GalleryIndex | None) -> str:
        if index is None:
            return "Gallery: empty. Upload images, then press 'Use this gallery'."
        status = f"Gallery: {len(index)} image{'s' if len(index) != 1 else ''}."
        if index.problems:
            status += " Skipped: " + "; ".join(index.problems[:5]) + (" ..." if len(index.problems) > 5 else "")
        return status

    def search(self, query: str, k: float, items: list[GalleryItem]):
        query = parse_texts(query, "query", "\n")[0]
        if not items:
            raise DemoInputError("the gallery is empty: upload images under 'Gallery'")
        index = self.galleries.get(items)
        hits = index.search(self.models.encode_texts([query])[0], int(k))
        gallery = [(str(hit.thumbnail), f"{hit.item.name} ({hit.score:.3f})") for hit in hits]
        table = [[rank, hit.item.name, round(hit.score, 4)] for rank, hit in enumerate(hits, start=1)]
        return gallery, table, f"Top {len(hits)} of {len(index)} images for “{query}”."

    def set_gallery(self, include_default: bool, uploads: list[str] | None):
        """The session's gallery: the server's default gallery (chosen at start-up) if asked for, plus uploads.
        `uploads` are files gradio received from this client (gradio refuses paths outside its upload folder)."""
        items: list[GalleryItem] = list(self.default_gallery) if include_default else []
        upload_folder = Path(gr.utils.get_upload_folder()).resolve()
        for upload in uploads or []:
            if not Path(upload).resolve().is_relative_to(upload_folder):  # gradio refuses these already
                raise DemoInputError(f"{Path(upload).name}: not an uploaded file")
        if uploads:
            if len(uploads) > MAX_GALLERY_IMAGES:
                raise DemoInputError(f"{len(uploads)} files uploaded; at most {MAX_GALLERY_IMAGES}")
            items += uploaded_images(uploads)
        if not items:
            raise DemoInputError("the gallery would be empty: keep the default gallery or upload images")
        return items, self.gallery_status(self.galleries.get(items))

    def rank_captions(self, image_path: str | None, captions_text: str):
        image = _image_from_upload(image_path)
        captions = parse_texts(captions_text, "caption", "\n")
        scores = self.models.encode_texts(captions) @ self.models.encode_images([image])[0]
        order = np.argsort(-scores, kind="stable")
        table = [[rank, captions[index], round(float(scores[index]), 4)] for rank, index in enumerate(order, start=1)]
        return table, f"Ranked {len(captions)} captions by cosine similarity to the image."

    def classify(self, image_path: str | None, labels_text: str, template: str):
        image = _image_from_upload(image_path)
        labels = parse_texts(labels_text, "label", ",\n")
        template = (template or DEFAULT_TEMPLATE).strip()
        if template.count("{}") != 1:
            raise DemoInputError("the prompt template must contain {} exactly once, e.g. 'a photo of a {}.'")
        logits = self.models.logit_scale * (
            self.models.encode_texts([template.format(label) for label in labels])
            @ self.models.encode_images([image])[0]
        )
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        best = int(np.argmax(probabilities))
        return (
            {label: float(p) for label, p in zip(labels, probabilities)},
            f"Most likely: {labels[best]} ({100 * probabilities[best]:.1f}%), prompts “{template}”.",
        )

    def regions(self, image_path: str | None, caption: str):
        if self.models.teacher is None:
            raise DemoInputError("no teacher is loaded: start the demo with --teacher PATH_OR_HUB_ID")
        image = _image_from_upload(image_path)
        caption = parse_texts(caption, "caption", "\n")[0]
        view = region_view(self.models.teacher, self.models.teacher_processor, image, caption)
        headers = ["region", "box (x1, y1, x2, y2)"] + _unique_headers(view.words)
        return (
            view.annotated,
            pd.DataFrame(view.rows, columns=headers),
            f"{len(view.rows)} regions; teacher score of the pair: {view.pair_score:.3f}. "
            "Each cell: how much of the region's attention goes to the word (%).",
        )


def build_interface(app: DemoApp) -> gr.Blocks:
    """The gradio Blocks of the demo."""
    with gr.Blocks(title="DCLIP demo") as blocks:
        gr.Markdown(
            "# DCLIP: Distill CLIP\n"
            "Search images with text, rank captions, classify with your own labels, and look at the regions the "
            f"teacher reads. {app.models.description}"
        )
        gallery_state = gr.State(list(app.default_gallery))
        with gr.Tab("Search images by text"):
            with gr.Row():
                query = gr.Textbox(label="Query", placeholder="a cat", elem_id="query", scale=4)
                top_k = gr.Slider(1, 24, value=DEFAULT_RESULTS, step=1, label="Results", elem_id="top-k", scale=1)
            search_button = gr.Button("Search", variant="primary", elem_id="search-button")
            search_status = gr.Markdown(elem_id="search-status")
            results = gr.Gallery(
                label="Best matches", columns=6, height=300, object_fit="cover", elem_id="results-gallery"
            )
            results_table = gr.Dataframe(headers=["rank", "image", "cosine"], label="Ranking", elem_id="results-table")
            with gr.Accordion("Gallery", open=False):
                use_default = gr.Checkbox(
                    value=bool(app.default_gallery),
                    label=f"The demo's own gallery ({len(app.default_gallery)} images)",
                    interactive=bool(app.default_gallery),
                )
                uploads = gr.File(
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                    label=f"Upload images (each at most {MAX_IMAGE_BYTES // 2**20} MB)",
                    elem_id="gallery-uploads",
                )
                gallery_button = gr.Button("Use this gallery", elem_id="gallery-button")
                gallery_status = gr.Markdown(app.gallery_status(app.default_index), elem_id="gallery-status")
        with gr.Tab("Image to text"):
            with gr.Row():
                image = gr.File(file_types=["image"], type="filepath", label="Image", elem_id="text-image")
                preview = gr.Image(label="Preview", interactive=False, height=260, elem_id="text-image-preview")
            captions = gr.Textbox(lines=4, label="Captions to rank (one per line)", elem_id="captions")
            rank_button = gr.Button("Rank captions", elem_id="rank-button")
            caption_table = gr.Dataframe(
                headers=["rank", "caption", "cosine"], label="Ranking", elem_id="caption-table"
            )
            labels = gr.Textbox(label="Labels (comma separated)", placeholder="cat, dog, car", elem_id="labels")
            template = gr.Textbox(value=DEFAULT_TEMPLATE, label="Prompt template", elem_id="template")
            classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
            label_output = gr.Label(num_top_classes=5, label="Zero-shot classification", elem_id="classify-label")
            image_status = gr.Markdown(elem_id="image-status")
        with gr.Tab("Teacher regions"):
            with gr.Row():
                region_image = gr.File(file_types=["image"], type="filepath", label="Image", elem_id="region-image")
                region_output = gr.Image(label="Regions", interactive=False, elem_id="region-output")
            region_caption = gr.Textbox(
                label="Caption", placeholder="a cat lying on a blanket", elem_id="region-caption"
            )
            region_button = gr.Button("Show regions", elem_id="region-button")
            region_table = gr.Dataframe(label="Region-to-word attention (%)", elem_id="region-table")
            region_status = gr.Markdown(
                "" if app.models.teacher is not None else "No teacher loaded: start the demo with --teacher.",
                elem_id="region-status",
            )

        search_inputs = [query, top_k, gallery_state]
        search_handler = shows_errors(None, None)(app.search)
        search_button.click(search_handler, search_inputs, [results, results_table, search_status], api_name="search")
        query.submit(search_handler, search_inputs, [results, results_table, search_status], api_visibility="private")
        gallery_button.click(
            shows_errors(gr.skip())(app.set_gallery),
            [use_default, uploads],
            [gallery_state, gallery_status],
            api_name="upload_gallery",
        )

        @shows_errors(None, None, None)
        def show_preview(path):
            # A new image: earlier rankings and labels belong to the previous one.
            return (_image_from_upload(path) if path else None), None, None, ""

        image.change(
            show_preview, [image], [preview, caption_table, label_output, image_status], api_visibility="private"
        )
        rank_button.click(
            shows_errors(None)(app.rank_captions), [image, captions], [caption_table, image_status], api_name="rank"
        )
        classify_button.click(
            shows_errors(None)(app.classify),
            [image, labels, template],
            [label_output, image_status],
            api_name="classify",
        )
        region_button.click(
            shows_errors(None, None)(app.regions),
            [region_image, region_caption],
            [region_output, region_table, region_status],
            api_name="regions",
        )
    return blocks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dclip demo", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default=None, help="student: a saved folder or Hub id (default: newest `dclip run`)")
    parser.add_argument("--teacher", default=None, help="teacher for the region view: a saved folder or Hub id")
    parser.add_argument("--runs-dir", action="append", default=None, help="where to look for `dclip run` outputs")
    parser.add_argument(
        "--gallery", default=None, metavar="DIR", help="a folder of images on this machine added to the gallery"
    )
    parser.add_argument("--no-sample-photos", action="store_true", help="leave the packages' sample photos out")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return parser.parse_args(argv)


def _stop_on_sigterm(signum: int, frame) -> None:
    # gradio's launch() waits in the main thread and closes its server on KeyboardInterrupt (what SIGINT raises);
    # SIGTERM (kill, docker stop, systemd) takes the same way out instead of killing the process mid-request.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None, space_dir: Path | None = None) -> int:
    """
    Start the demo and serve until SIGINT or SIGTERM, then close the server (freeing its port) and return 0.

    Args:
        argv: command-line arguments (see `parse_args`); default `sys.argv[1:]`.
        space_dir: the Space folder whose README lists the default models (`spaces_demo/`), when run as a Space.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    choice = choose_models(args.model, args.teacher, args.runs_dir, app_dir=space_dir)
    logger.info("loading models: %s", choice)
    models = DemoModels.load(choice)
    default_gallery = [] if args.no_sample_photos else sample_photos()
    if args.gallery:
        default_gallery += folder_images(args.gallery)
    thumbnail_dir = Path(tempfile.mkdtemp(prefix="dclip-demo-thumbnails-"))
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    blocks = None
    try:
        app = DemoApp(models, default_gallery, thumbnail_dir)
        logger.info("gallery of %d images embedded", len(default_gallery))
        blocks = build_interface(app)
        blocks.queue(default_concurrency_limit=2).launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=MAX_IMAGE_BYTES,
            allowed_paths=[str(thumbnail_dir)],
            ssr_mode=False,
            show_error=False,
        )
    except KeyboardInterrupt:
        pass  # a signal before the server was up: nothing is listening yet
    finally:
        if blocks is not None:
            blocks.close()
        signal.signal(signal.SIGTERM, previous_handler)
        shutil.rmtree(thumbnail_dir, ignore_errors=True)
    logger.info("demo stopped")
    return 0
