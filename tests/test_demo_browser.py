"""
The Spaces demo, started as its README says, driven in a real browser (Debian's Chromium through Playwright) and
under load through gradio_client.

The known answers need a model that really matches images and text: the embedded-default student's projections are
untrained, so the fixture fits the two projections (a few hundred contrastive steps on frozen tower features of the
gallery's photos and their captions, seconds on a CPU), checks that an untrained student gets the same questions
wrong, and saves the fitted student with a teacher built on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

APP = REPO / "spaces_demo" / "app.py"  # the Space's entry point, which runs modeling_dclip.demo.app
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("DCLIP_TEST_ARTIFACTS", REPO / "test-artifacts"))
SERVER_START_TIMEOUT_S = 240

# scikit-image sample photo -> (file name in the test gallery, training captions)
GALLERY = {
    "chelsea.png": ("chelsea.png", ["a photo of a cat", "a tabby cat with green eyes", "the face of a cat"]),
    "coffee.png": ("coffee.png", ["a cup of coffee", "an espresso in a red cup on a saucer", "a coffee with a spoon"]),
    "rocket.jpg": ("rocket.jpg", ["a rocket on a launch pad", "a space rocket at night", "a rocket before launch"]),
    "astronaut.png": (
        "astronaut.png",
        ["an astronaut in a space suit", "a portrait of an astronaut with a flag", "a woman astronaut smiling"],
    ),
    "motorcycle_left.png": ("motorcycle.png", ["a motorcycle", "a red motorcycle parked indoors", "a motorbike"]),
    "hubble_deep_field.jpg": (
        "galaxies.jpg",
        ["galaxies in deep space", "a telescope image of distant galaxies", "stars and galaxies on a black sky"],
    ),
    "camera.png": (
        "cameraman.png",
        ["a man with a camera on a tripod", "a black and white photo of a photographer", "a cameraman outdoors"],
    ),
    "coins.png": ("coins.png", ["old coins", "many coins on a dark background", "a collection of coins"]),
}
# Queries that are not training captions, with the image each must find first.
KNOWN_ANSWERS = {
    "a cat": "chelsea",
    "coffee": "coffee",
    "a rocket": "rocket",
    "an astronaut": "astronaut",
    "a motorbike": "motorcycle",
}


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


needs_demo_stack = pytest.mark.skipif(
    _missing("gradio") or _missing("gradio_client") or _missing("faiss") or _missing("skimage"),
    reason="the demo needs gradio, gradio_client, faiss-cpu and scikit-image (extras: demo, dev)",
)
needs_browser = pytest.mark.skipif(
    _missing("playwright") or not Path(CHROMIUM).is_file(),
    reason="needs the playwright Python package and Debian's Chromium (apt-get install chromium) at /usr/bin/chromium",
)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("demo_load", REPO / "benchmarks" / "demo_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through the module's entry
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def _tower_features(model, processor, images, captions) -> tuple[torch.Tensor, torch.Tensor]:
    """The towers' pooled outputs, as the projections receive them (read with hooks on the projections)."""
    captured = {}
    hooks = [
        model.visual_projection.register_forward_hook(lambda module, args, out: captured.update(image=args[0])),
        model.text_projection.register_forward_hook(lambda module, args, out: captured.update(text=args[0])),
    ]
    model.get_image_features(pixel_values=processor(images=images)["pixel_values"])
    encoded = processor(text=captions)
    model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    for hook in hooks:
        hook.remove()
    return captured["image"], captured["text"]


def fit_projections(model, processor, images, captions_per_image, steps: int = 100) -> None:
    """Fit the student's two projections contrastively on frozen tower features (both directions); every image
    has the same number of captions."""
    per_image = len(captions_per_image[0])
    captions = [caption for captions in captions_per_image for caption in captions]
    caption_to_image = torch.arange(len(images)).repeat_interleave(per_image)
    image_features, text_features = _tower_features(model, processor, images, captions)
    visual = model.visual_projection.weight.detach().clone().requires_grad_(True)
    textual = model.text_projection.weight.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([visual, textual], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        image_embeds = F.normalize(image_features @ visual.T, dim=-1)
        text_embeds = F.normalize(text_features @ textual.T, dim=-1)
        logits = 20.0 * text_embeds @ image_embeds.T
        # One caption per image for the image->text direction, drawn afresh each step.
        picks = torch.arange(len(images)) * per_image + torch.randint(per_image, (len(images),), generator=generator)
        loss = F.cross_entropy(logits, caption_to_image) + F.cross_entropy(logits[picks].T, torch.arange(len(images)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.visual_projection.weight.copy_(visual)
        model.text_projection.weight.copy_(textual)


@torch.no_grad()
def first_hits(model, processor, images, names, queries) -> dict[str, str]:
    image_embeds = F.normalize(
        model.get_image_features(pixel_values=processor(images=images)["pixel_values"]).pooler_output, dim=-1
    )
    encoded = processor(text=queries)
    text_embeds = F.normalize(model.get_text_features(**encoded).pooler_output, dim=-1)
    return {query: names[int(index)] for query, index in zip(queries, (text_embeds @ image_embeds.T).argmax(dim=1))}


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    """A gallery folder of sample photos, a student fitted to it (with its processor) and a teacher on it."""
    import skimage
    from PIL import Image

    from modeling_dclip import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPModel, DCLIPProcessor, DCLIPTeacherModel

    root = tmp_path_factory.mktemp("demo")
    gallery = root / "gallery"
    gallery.mkdir()
    skimage_data = Path(skimage.__file__).parent / "data"
    for source, (target, _) in GALLERY.items():
        shutil.copy(skimage_data / source, gallery / target)
    names = [Path(target).stem for target, _ in GALLERY.values()]
    images = [Image.open(gallery / target).convert("RGB") for target, _ in GALLERY.values()]

    torch.manual_seed(0)
    student = DCLIPModel.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT, projection_dim=64).eval()
    processor = DCLIPProcessor.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)
    untrained = first_hits(student, processor, images, names, list(KNOWN_ANSWERS))
    # The negative control: the known answers are not reachable by chance with untrained projections.
    assert untrained != KNOWN_ANSWERS, "the untrained student already finds every known answer: the test cannot fail"
    fit_projections(student, processor, images, [captions for _, captions in GALLERY.values()])
    assert first_hits(student, processor, images, names, list(KNOWN_ANSWERS)) == KNOWN_ANSWERS

    teacher = DCLIPTeacherModel.from_backbone(student, fusion_dim=64, num_attention_heads=4, intermediate_size=128)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return {"gallery": gallery, "student": root / "student", "teacher": root / "teacher", "root": root}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on `port` and a new server can bind it (with SO_REUSEADDR, as servers do: the closed
    connections of the test clients may linger in TIME_WAIT)."""
    with socket.socket() as client:
        if client.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def demo_url(demo_files):
    """The demo started as its README says, on a free localhost port; stopped after the tests."""
    port = _free_port()
    log_path = demo_files["root"] / "app.log"
    command = [
        sys.executable,
        str(APP),
        "--model",
        str(demo_files["student"]),
        "--teacher",
        str(demo_files["teacher"]),
        "--gallery",
        str(demo_files["gallery"]),
        "--no-sample-photos",
        "--port",
        str(port),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"the demo exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the demo did not answer within {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        yield url
    finally:
        # Ctrl-C: the app closes its server and exits cleanly, and the port is free again.
        server.send_signal(signal.SIGINT)
        try:
            exit_code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            pytest.fail(f"the demo did not stop on SIGINT:\n{log_path.read_text()[-3000:]}")
        assert exit_code == 0, log_path.read_text()[-3000:]
        assert port_is_free(port)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def _first_row(page, elem_id: str) -> list[str]:
    """The cells of the first data row of a gradio Dataframe (a virtualised ARIA grid; row 1 is the header)."""
    cells = page.locator(f'#{elem_id} [role=row][aria-rowindex="2"] [role=gridcell]')
    return [cells.nth(index).inner_text().strip() for index in range(cells.count())]


def _textbox(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


@needs_demo_stack
@needs_browser
def test_search_classify_rank_and_regions_in_a_real_browser(demo_url, demo_files, browser, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(demo_url)

    # Text-to-image search: the known answer comes first, in the gallery and in the ranking table.
    _textbox(page, "query").fill("a cat")
    page.click("#search-button")
    page.wait_for_selector("#search-status >> text=images for “a cat”")
    assert _first_row(page, "results-table")[1] == "chelsea"
    assert page.locator("#results-gallery img").count() == 6
    captions = page.locator("#results-gallery").inner_text().split("\n")  # the label, then one caption per image
    assert captions[1].startswith("chelsea (")
    page.screenshot(path=str(ARTIFACTS / "demo_search.png"), full_page=True)

    # Image to text: zero-shot classification and caption ranking of an uploaded photo.
    page.get_by_role("tab", name="Image to text").click()
    page.locator("#text-image input[type=file]").set_input_files(str(demo_files["gallery"] / "chelsea.png"))
    page.wait_for_selector("#text-image-preview img")
    _textbox(page, "labels").fill("rocket, cat, cup of coffee, motorcycle")
    page.click("#classify-button")
    page.wait_for_selector("#image-status >> text=Most likely")
    assert "Most likely: cat (" in page.locator("#image-status").inner_text()
    assert page.locator("#classify-label").inner_text().split("\n")[1].strip() == "cat"  # after the label's title
    _textbox(page, "captions").fill("a rocket on a launch pad\na photo of a cat\ngalaxies in deep space")
    page.click("#rank-button")
    page.wait_for_selector("#image-status >> text=Ranked 3 captions")
    assert _first_row(page, "caption-table")[1] == "a photo of a cat"
    page.screenshot(path=str(ARTIFACTS / "demo_classify.png"), full_page=True)

    # A file that is not an image gets a message in the page, and the app keeps answering.
    broken = tmp_path / "broken.png"
    broken.write_text("this is not a PNG")
    page.locator('#text-image button[aria-label="Clear"]').click()
    page.locator("#text-image input[type=file]").set_input_files(str(broken))
    page.wait_for_selector("#image-status >> text=broken.png: not a readable image")
    assert "Traceback" not in page.content()
    page.screenshot(path=str(ARTIFACTS / "demo_bad_image.png"), full_page=True)

    # The teacher's regions with their region-to-word attention.
    page.get_by_role("tab", name="Teacher regions").click()
    page.locator("#region-image input[type=file]").set_input_files(str(demo_files["gallery"] / "coffee.png"))
    _textbox(page, "region-caption").fill("a cup of coffee")
    page.click("#region-button")
    page.wait_for_selector("#region-status >> text=regions; teacher score")
    assert page.locator("#region-output img").count() == 1
    table = page.locator("#region-table").inner_text()
    assert "whole image" in table and "coffee" in table
    page.screenshot(path=str(ARTIFACTS / "demo_regions.png"), full_page=True)
    page.close()


@needs_demo_stack
def test_twenty_concurrent_searches_all_answer(demo_url):
    load = _load_benchmark()
    queries = [list(KNOWN_ANSWERS)[index % len(KNOWN_ANSWERS)] for index in range(20)]
    report = load.concurrent_searches(demo_url, queries, concurrency=20)
    assert report.errors == []
    assert len(report.answers) == 20
    for query, answer in zip(queries, report.answers):
        assert answer == KNOWN_ANSWERS[query], query
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "demo_load.json").write_text(json.dumps(report.summary(), indent=2))
    assert statistics.median(report.latencies_s) == report.summary()["median_s"]


@needs_demo_stack
def test_api_rejects_bad_input_with_a_message(demo_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _, status = client.predict(handle_file(str(broken)), "cat, dog", "a photo of a {}.", api_name="/classify")
    assert status.startswith("⚠️ broken.jpg: not a readable image")
    _, status = client.predict(handle_file(str(broken)), "cat, dog", "no placeholder", api_name="/classify")
    assert "⚠️" in status
    _, _, status = client.predict("   ", 3, api_name="/search")
    assert status == "⚠️ type at least one query"


@needs_demo_stack
def test_uploaded_gallery_is_searched_and_bad_uploads_are_named(demo_url, demo_files, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)  # one client: one session, whose gallery the upload replaces
    broken = tmp_path / "broken.png"
    broken.write_text("not a PNG")
    uploads = [handle_file(str(demo_files["gallery"] / name)) for name in ("coffee.png", "rocket.jpg")]
    status = client.predict(False, [*uploads, handle_file(str(broken))], api_name="/upload_gallery")
    assert status.startswith("Gallery: 2 images. Skipped: broken.png: not a readable image")
    _, table, _ = client.predict("a cat", 5, api_name="/search")
    assert sorted(row[1] for row in table["data"]) == ["coffee", "rocket"]
    _, table, _ = client.predict("a rocket", 1, api_name="/search")
    assert table["data"][0][1] == "rocket"


def test_space_readme_is_valid_spaces_metadata():
    from huggingface_hub import SpaceCard
    from huggingface_hub.utils import validate_repo_id

    card = SpaceCard.load(REPO / "spaces_demo" / "README.md")
    metadata = card.data.to_dict()
    assert metadata["sdk"] == "gradio"
    assert (REPO / "spaces_demo" / metadata["app_file"]).is_file()
    assert metadata["title"] and metadata["license"] == "apache-2.0"
    assert metadata["colorFrom"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert metadata["colorTo"] in {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert len(metadata["short_description"]) <= 60
    for model in metadata["models"]:
        validate_repo_id(model)
    from packaging.requirements import Requirement
    from packaging.version import Version

    if not _missing("gradio"):
        import gradio

        # The Space runs the gradio of sdk_version; the app is written against this major version's API.
        assert Version(metadata["sdk_version"]).major == Version(gradio.__version__).major

    for line in (REPO / "spaces_demo" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            Requirement(line)  # raises on a malformed requirement


@needs_demo_stack
def test_no_endpoint_lets_a_client_name_a_server_path(demo_url, demo_files, tmp_path):
    """Files reach the app only as uploads: no endpoint takes a text naming a server file or folder, and a server
    path given where a file is expected is refused by gradio."""
    from gradio_client import Client, handle_file

    client = Client(demo_url, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/set_gallery" not in endpoints
    (parameters,) = [endpoint["parameters"] for name, endpoint in endpoints.items() if name == "/upload_gallery"]
    assert [parameter["component"] for parameter in parameters] == ["Checkbox", "File"]
    # A file of the server, named by its path in a raw API call instead of uploaded: refused, nothing indexed.
    secret = demo_files["gallery"] / "coffee.png"
    request = urllib.request.Request(
        f"{demo_url}gradio_api/call/upload_gallery",
        data=json.dumps({"data": [False, [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}]]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{demo_url}gradio_api/call/upload_gallery/{event_id}", timeout=60) as response:
        stream = response.read().decode()
    assert "event: error" in stream and "Gallery: 1 image" not in stream, stream
    status = client.predict(True, [handle_file(str(demo_files["gallery"] / "rocket.jpg"))], api_name="/upload_gallery")
    assert status.startswith("Gallery: 9 images")  # the operator's 8 (--gallery) and the upload


@needs_demo_stack
def test_default_gallery_is_the_packages_sample_photos():
    from modeling_dclip.demo.gallery import sample_photos

    photos = {item.name: item.path for item in sample_photos()}
    assert {"chelsea", "coffee", "astronaut", "rocket"} <= set(photos)
    assert all(path.is_file() for path in photos.values())


def _fake_run(folder: Path, age_s: float) -> Path:
    (folder / "student").mkdir(parents=True)
    (folder / "student" / "config.json").write_text("{}")
    (folder / "teacher").mkdir()
    (folder / "teacher" / "config.json").write_text("{}")
    results = folder / "results.json"
    results.write_text("{}")
    os.utime(results, (time.time() - age_s, time.time() - age_s))
    return folder


def test_demo_takes_the_newest_run_output_then_the_embedded_default(tmp_path, monkeypatch):
    from modeling_dclip.demo import models as demo_models

    monkeypatch.delenv("DCLIP_STUDENT", raising=False)
    monkeypatch.delenv("DCLIP_TEACHER", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    _fake_run(tmp_path / "runs" / "older", age_s=3600)
    newer = _fake_run(tmp_path / "runs" / "newer", age_s=60)
    (tmp_path / "runs" / "unfinished" / "student").mkdir(parents=True)  # no results.json: not a finished run

    choice = demo_models.choose_models(runs_dirs=[tmp_path / "runs"])
    assert (choice.student, choice.teacher) == (str(newer / "student"), str(newer / "teacher"))
    assert demo_models.choose_models("org/student", runs_dirs=[tmp_path / "runs"]).student == "org/student"
    monkeypatch.setenv("DCLIP_STUDENT", "org/from-env")
    assert demo_models.choose_models(runs_dirs=[tmp_path / "runs"]).student == "org/from-env"
    monkeypatch.delenv("DCLIP_STUDENT")
    fallback = demo_models.choose_models(runs_dirs=[tmp_path / "nothing-here"])
    assert fallback.student is None and "untrained projections" in fallback.origin
    # In a Space without runs, the README's models are the defaults.
    monkeypatch.setenv("SPACE_ID", "org/dclip-demo")
    in_space = demo_models.choose_models(runs_dirs=[tmp_path / "nothing-here"], app_dir=APP.parent)
    assert (in_space.student, in_space.teacher) == ("dclip-project/dclip-student", "dclip-project/dclip-teacher")


@needs_demo_stack
def test_dclip_demo_passes_its_arguments_to_the_app():
    from modeling_dclip.cli import build_parser
    from modeling_dclip.commands.demo import app_arguments
    from modeling_dclip.demo.app import parse_args

    args = build_parser().parse_args(
        ["demo", "--model", "m", "--gallery", "g", "--no-sample-photos", "--runs-dir", "r", "--port", "1234"]
    )
    app_args = parse_args(app_arguments(args))
    assert (app_args.model, app_args.gallery, app_args.runs_dir, app_args.port) == ("m", "g", ["r"], 1234)
    assert app_args.no_sample_photos and app_args.teacher is None and app_args.host == "127.0.0.1"


@needs_demo_stack
def test_gallery_refuses_bad_files_with_their_names(tmp_path):
    from PIL import Image

    from modeling_dclip.demo import gallery as demo_gallery

    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "transparent.png")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (demo_gallery.MAX_IMAGE_BYTES + 1))
    with pytest.raises(demo_gallery.GalleryInputError, match="notes.txt: not an image file"):
        demo_gallery.open_image(tmp_path / "notes.txt")
    with pytest.raises(demo_gallery.GalleryInputError, match="truncated.png: not a readable image"):
        demo_gallery.open_image(tmp_path / "truncated.png")
    with pytest.raises(demo_gallery.GalleryInputError, match="big.jpg: 10.0 MB is above the 10 MB limit"):
        demo_gallery.open_image(big)
    # Transparent pixels are shown over white, as a viewer would.
    assert demo_gallery.open_image(tmp_path / "transparent.png").getpixel((0, 0)) == (255, 255, 255)
    items = demo_gallery.folder_images(tmp_path)
    assert sorted(item.name for item in items) == ["big", "transparent", "truncated"]
    with pytest.raises(demo_gallery.GalleryInputError, match="no such folder"):
        demo_gallery.folder_images(tmp_path / "absent")
