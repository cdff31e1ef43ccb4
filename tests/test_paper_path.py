"""The paper's path offline: a CLIP base (a tiny random `CLIPModel` saved to disk with OpenAI's tokenizer), a real COCO
detector (the shared YOLOv8n int8 ONNX) and real photos (40 Flickr8k photos as a Karpathy subset) through
`dclip run --base-model DIR --detector ONNX --data SUBSET`; and `dclip regions` killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHARED, accelerate_launch, karpathy_subset
from safetensors import safe_open
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from modeling_dclip import DCLIPModel
from modeling_dclip.cli import main

FLICKR = SHARED / "data" / "flickr8k"
TOKENIZER = SHARED / "clip-tokenizer"
DETECTOR = SHARED / "models" / "yolov8n-coco-int8" / "yolov8n_int8.onnx"

pytestmark = [
    pytest.mark.skipif(
        not (FLICKR / "dataset_flickr8k.json").is_file() or not DETECTOR.is_file() or not TOKENIZER.is_dir(),
        reason=f"the shared photos, detector or CLIP tokenizer is absent under {SHARED}",
    ),
    pytest.mark.skipif(
        __import__("importlib").util.find_spec("onnxruntime") is None, reason="onnxruntime (dclip[yolo]) is absent"
    ),
]


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory) -> Path:
    """A random CLIP small enough for a test, saved with OpenAI's BPE tokenizer and a CLIP image processor."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=49408,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    tokenizer = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_run_from_a_clip_with_a_real_detector_on_real_photos(tiny_clip_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    data = karpathy_subset(tmp_path / "photos", {"train": 20, "val": 10, "test": 10})
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--preset",
            "tiny",
            "--base-model",
            str(tiny_clip_folder),
            "--detector",
            str(DETECTOR),
            "--data",
            str(data),
            "--output-dir",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "align_base" not in captured.out and "base_model: running" in captured.out  # no alignment, as in the paper

    # The base is the CLIP unchanged.
    clip, base = CLIPModel.from_pretrained(tiny_clip_folder).eval(), DCLIPModel.from_pretrained(out / "base").eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_folder)
    inputs = processor(text=["a dog runs on the grass"], images=[torch.rand(3, 60, 50)], return_tensors="pt")
    with torch.no_grad():
        for method, keys in (("get_image_features", ["pixel_values"]), ("get_text_features", ["input_ids"])):
            expected = getattr(clip, method)(**{k: inputs[k] for k in keys}).pooler_output
            found = getattr(base, method)(**{k: inputs[k] for k in keys}).pooler_output
            torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)

    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"base", "teacher", "student"}
    regions = results["dataset"]["regions"]
    assert regions["type"] == "yolo" and regions["weights_content"]
    # The student exports back to a plain CLIPModel.
    exported = DCLIPModel.from_pretrained(out / "student").to_clip()
    exported.save_pretrained(tmp_path / "exported")
    assert CLIPModel.from_pretrained(tmp_path / "exported").config.projection_dim == 16

    # The teacher's folder alone, moved elsewhere, loads its processor and detects with its own detector.
    moved = tmp_path / "elsewhere" / "teacher"
    shutil.copytree(out / "teacher", moved)
    script = (
        "import sys; from PIL import Image; from modeling_dclip import DCLIPProcessor\n"
        "processor = DCLIPProcessor.from_pretrained(sys.argv[1])\n"
        "regions = processor.region_extractor([Image.open(sys.argv[2]).convert('RGB')])\n"
        "print(processor.region_config['weights'], len(regions[0]))\n"
    )
    photo = next((data / "images").iterdir())
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    loaded = subprocess.run(
        [sys.executable, "-c", script, str(moved), str(photo)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr
    weights, count = loaded.stdout.split()[-2:]
    # Saved as a reference inside the folder, resolved on load to the copy in the moved folder.
    saved = json.loads((moved / "processor_config.json").read_text())["region_config"]["weights"]
    assert not Path(saved).is_absolute() and (moved / saved).is_file()
    assert Path(weights).resolve().is_relative_to(moved.resolve()) and int(count) >= 1


REGIONS_COMMAND = [
    "-m",
    "modeling_dclip.cli",
    "regions",
    "--split",
    "all",
    "--detector",
    str(DETECTOR),
    "--chunk-size",
    "2",
    "--json",
]


def test_regions_killed_midway_resume_where_they_stopped(tmp_path):
    data = karpathy_subset(tmp_path / "photos", {"train": 4, "val": 1, "test": 1})
    store = tmp_path / "store"
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, *REGIONS_COMMAND, "--data", str(data), "--feature-store", str(store)]
    worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    chunks = []
    while not chunks and time.time() < deadline and worker.poll() is None:
        chunks = list(store.glob("region_boxes/*/*.safetensors"))
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    done = {path: path.stat().st_mtime_ns for path in store.glob("region_boxes/*/*.safetensors")}
    assert 1 <= len(done) < 3, done

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert summary["images"] == 6
    after = list(store.glob("region_boxes/*/*.safetensors"))
    assert set(done) <= set(after) and len(after) == 3
    # The chunks finished before the kill were read back, not detected again.
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in done.items())


def test_regions_split_between_two_processes_equal_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on a CPU): the processes share the chunks, and the
    stored regions equal those one process finds."""
    data = karpathy_subset(tmp_path / "photos", {"train": 4, "val": 1, "test": 1})
    env = {**os.environ, "YOLO_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    accelerate = [*accelerate_launch(2), "-m"]
    two = subprocess.run(
        [*accelerate, *REGIONS_COMMAND[1:], "--data", str(data), "--feature-store", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, *REGIONS_COMMAND, "--data", str(data), "--feature-store", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    summaries = [json.loads(run.stdout[run.stdout.index("{") :]) for run in (two, one)]
    assert summaries[0]["images"] == summaries[1]["images"] == 6
    assert summaries[0]["top_classes"] == summaries[1]["top_classes"]
    assert summaries[0]["detections_per_image"] == summaries[1]["detections_per_image"]
    chunks = {
        name: sorted(p.name for p in (tmp_path / name).glob("region_boxes/*/*.safetensors")) for name in ("two", "one")
    }
    assert len(chunks["two"]) == 3 and chunks["two"] == chunks["one"]  # the same chunks, each computed once
    workers = set()
    for path in (tmp_path / "two").glob("region_boxes/*/*.safetensors"):
        with safe_open(str(path), "pt") as chunk:
            workers.add(json.loads(chunk.metadata()["parts"])["process"])
    assert workers == {0, 1}  # both processes detected some of the photos
