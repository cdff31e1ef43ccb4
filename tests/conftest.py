"""Shared fixtures: small real models built once per session, and one `dclip run --preset tiny` output."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

import modeling_dclip
from modeling_dclip import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPConfig, DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.towers import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"


def _installed_package_file() -> Path | None:
    """Where a regular (not editable) install of the `dclip` distribution into this environment's site-packages put
    `modeling_dclip/__init__.py` (a `dclip.egg-info` of a source tree on sys.path does not count)."""
    for site_packages in site.getsitepackages():
        for distribution in importlib.metadata.distributions(name="dclip", path=[site_packages]):
            direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
            if direct_url.get("dir_info", {}).get("editable"):
                return None
            return Path(distribution.locate_file("modeling_dclip/__init__.py")).resolve()
    return None


def pytest_configure(config) -> None:
    """Several tests interrupt a subprocess with SIGINT (Ctrl-C) and check that it stops cleanly. A shell without job
    control starts background commands with SIGINT ignored, and an ignored signal stays ignored through exec, so
    their subprocesses would never see it: give this process a handler (exec resets a handled signal to the default)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config) -> str:
    return f"modeling_dclip imported from {modeling_dclip.__file__}"


def pytest_sessionstart(session) -> None:
    # Where dclip is installed from a wheel (CI), the tests must exercise that installed package, not the source tree.
    installed = _installed_package_file()
    if installed is not None and "PYTHONPATH" not in os.environ:
        imported = Path(modeling_dclip.__file__).resolve()
        assert imported == installed, f"the tests import {imported}, not the installed package at {installed}"


def karpathy_subset(folder: Path, counts: dict[str, int]) -> Path:
    """The first photos of each Flickr8k split, copied with their captions into a Karpathy-format folder."""
    source = json.loads((SHARED_DATA / "flickr8k" / "dataset_flickr8k.json").read_text())
    kept = []
    for entry in source["images"]:
        if counts.get(entry["split"], 0) > 0:
            counts[entry["split"]] -= 1
            kept.append(entry)
    (folder / "images").mkdir(parents=True)
    for entry in kept:
        shutil.copy(SHARED_DATA / "flickr8k" / "images" / entry["filename"], folder / "images" / entry["filename"])
    (folder / "dataset_subset.json").write_text(json.dumps({"dataset": "flickr8k", "images": kept}))
    return folder


def accelerate_launch(num_processes: int = 1, mixed_precision: str = "no") -> list[str]:
    """The `accelerate launch` prefix (the script or `-m module` and its arguments follow) for `num_processes` CPU
    processes, gloo with `--multi_gpu` from two on; every setting a user's accelerate config file would supply is given,
    so no test depends on one."""
    multi_gpu = ["--multi_gpu"] if num_processes > 1 else []
    return [
        *(sys.executable, "-m", "accelerate.commands.launch", *multi_gpu),
        *("--num_processes", str(num_processes), "--num_machines", "1"),
        *("--mixed_precision", mixed_precision, "--dynamo_backend", "no"),
    ]


def dclip_command() -> str:
    """The `dclip` console script of the environment running the tests."""
    script = shutil.which("dclip", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip(f"no `dclip` console script beside {sys.executable}: install the package (pip install .)")
    return script


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One `dclip run --preset tiny` output (base, teacher, student, results.json), made by the `dclip` console
    script from a folder outside the repository (about a minute on 2 CPU cores); shared by the tests that read it."""
    outside = tmp_path_factory.mktemp("outside")
    output = outside / "run"
    result = subprocess.run(
        [dclip_command(), "run", "--preset", "tiny", "--output-dir", str(output)],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output


TINY_TOWER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
TINY_TEXT = dict(vocab_size=30522, max_position_embeddings=64, bos_token_id=101, eos_token_id=102, pad_token_id=0)
"""The embedded text tower's (BERT) vocabulary and special tokens: a tiny text tower read by its tokenizer."""


def tiny_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def tiny_student(
    layers: int = 1, projection_dim: int = 16, text_pooling: str | None = "mean", max_position_embeddings: int = 64
) -> tuple[DCLIPModel, DCLIPProcessor]:
    """A DCLIP student of two random `layers`-layer towers (32-px images, the embedded tokenizer's vocabulary), built
    after `torch.manual_seed(0)`, and its processor."""
    tower = {**TINY_TOWER, "num_hidden_layers": layers}
    text = CLIPTextConfig(**tower, **{**TINY_TEXT, "max_position_embeddings": max_position_embeddings})
    config = DCLIPConfig(
        vision_config=CLIPVisionConfig(**tower, image_size=32, patch_size=8).to_dict(),
        text_config=text.to_dict(),
        projection_dim=projection_dim,
        text_pooling=text_pooling,
    )
    torch.manual_seed(0)
    student = DCLIPModel(config).eval()
    return student, DCLIPProcessor(image_processor=tiny_image_processor(), tokenizer=load_tokenizer(EMBEDDED_TEXT))


def teacher_features(
    teacher: DCLIPTeacherModel, images: int, texts: int, regions: int = 3, tokens: int = 5
) -> dict[str, torch.Tensor]:
    """Random cached-feature inputs of the teacher's `fuse` / `score_pairs` (`images` images, `texts` captions;
    every second image's last region and every third caption's last two tokens are padding), from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    embed_dim, hidden = teacher.config.base_config.projection_dim, teacher.base.text_embed_dim
    region_mask = torch.ones(images, regions, dtype=torch.long)
    region_mask[::2, -1] = 0
    attention_mask = torch.ones(texts, tokens, dtype=torch.long)
    attention_mask[1::3, -2:] = 0
    corners = torch.rand(images, regions, 2, generator=generator) * 0.5
    return {
        "region_embeds": F.normalize(torch.randn(images, regions, embed_dim, generator=generator), dim=-1),
        "region_boxes": torch.cat([corners, corners + 0.5], dim=-1),
        "region_scores": torch.rand(images, regions, generator=generator),
        "region_mask": region_mask,
        "image_embeds": F.normalize(torch.randn(images, embed_dim, generator=generator), dim=-1),
        "text_states": torch.randn(texts, tokens, hidden, generator=generator),
        "attention_mask": attention_mask,
        "text_embeds": F.normalize(torch.randn(texts, embed_dim, generator=generator), dim=-1),
    }


def tiny_clip_config(projection_dim: int = 16) -> CLIPConfig:
    """A CLIP small enough to build and run in milliseconds."""
    return CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=99,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=30,
            patch_size=6,
        ),
        projection_dim=projection_dim,
    )


@pytest.fixture(scope="session")
def tiny_clip() -> CLIPModel:
    torch.manual_seed(0)
    return CLIPModel(tiny_clip_config()).eval()


@pytest.fixture(scope="session")
def embedded_student():
    torch.manual_seed(0)
    return DCLIPModel.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT, projection_dim=64).eval()


@pytest.fixture(scope="session")
def embedded_processor():
    from modeling_dclip import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPProcessor

    return DCLIPProcessor.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)


@pytest.fixture(scope="session")
def sample_photos():
    """Real photographs shipped by scikit-image: (name, PIL image)."""
    import skimage.data
    from PIL import Image

    return {
        name: Image.fromarray(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "astronaut", "rocket")
    }


@pytest.fixture(scope="session", autouse=True)
def feature_store_root(tmp_path_factory) -> Path:
    """The tests' feature store: a fresh folder for the session (and the processes it starts), never the user's."""
    import os

    root = tmp_path_factory.mktemp("feature-store")
    previous = os.environ.get("DCLIP_FEATURE_STORE")
    os.environ["DCLIP_FEATURE_STORE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("DCLIP_FEATURE_STORE", None)
    else:
        os.environ["DCLIP_FEATURE_STORE"] = previous


# Read when pytest imports this file, before any test.
SESSION_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")


def _set_session_omp_threads() -> None:
    if SESSION_OMP_THREADS is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = SESSION_OMP_THREADS


@pytest.fixture(autouse=True)
def omp_threads_kept():
    """Importing ultralytics (`pytest.importorskip` in a test or a module's fixture) sets OMP_NUM_THREADS=1 in this
    process's environment where it is unset: every process a later test starts would then compute on one thread,
    while this one computes on the threads its torch started with, and their floating-point sums would differ. Every
    test starts and ends with the variable the session started with."""
    _set_session_omp_threads()
    yield
    _set_session_omp_threads()
