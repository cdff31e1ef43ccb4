"""`dclip index` / `dclip search` and the teacher re-ranker on a tiny saved student and teacher over images written
to tmp_path: the index returns the brute-force order, a build killed with SIGKILL resumes to the same embeddings, an
unreadable image is named and skipped, `--json` prints the ranked results, and re-ranking orders the candidates by
the teacher's own pairwise score."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_student
from PIL import Image
from safetensors.torch import load_file

from modeling_dclip import DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.cli import main
from modeling_dclip.encoding import encode_texts
from modeling_dclip.feature_store import FeatureStore
from modeling_dclip.search.index import SearchIndex, build_faiss_index, load_index
from modeling_dclip.search.rerank import TeacherReranker

QUERIES = ["a red square", "two dogs on the grass", "a blue sky over the sea"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny student and a teacher over it (gates opened, so that its fusion changes the scores)."""
    root = tmp_path_factory.mktemp("models")
    student, processor = tiny_student()
    teacher = DCLIPTeacherModel.from_backbone(student, fusion_dim=16, num_attention_heads=2, intermediate_size=32)
    with torch.no_grad():
        teacher.image_gate.fill_(50.0)
        teacher.text_gate.fill_(50.0)
    paths = {"student": root / "student", "teacher": root / "teacher"}
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(paths[name])
        processor.save_pretrained(paths[name])
    return paths


def write_gallery(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo_{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (20 + index % 7, 36, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """Twelve images and one file that is not an image."""
    folder = tmp_path_factory.mktemp("gallery")
    write_gallery(folder, 12)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-store")


@pytest.fixture(scope="module")
def indexed(saved, gallery, store, tmp_path_factory) -> tuple[Path, str]:
    """`dclip index` over the gallery (in this process: the subprocess run is the kill -9 test's); its stderr."""
    output = tmp_path_factory.mktemp("index") / "gallery-index"
    arguments = ["index", "--model", str(saved["student"]), "--images", str(gallery), "--output", str(output)]
    arguments += ["--feature-store", str(store)]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(arguments + ["--batch-size", "5", "--chunk-size", "4"]) == 0
    return output, stderr.getvalue()


def test_exact_index_order_equals_brute_force():
    rng = np.random.default_rng(0)
    vectors = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((500, 32), dtype=np.float32)), dim=1)
    queries = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((20, 32), dtype=np.float32)), dim=1)
    index = SearchIndex.from_embeddings(vectors, [f"{i}.jpg" for i in range(500)])
    assert index.info["index"]["type"] == "flat"
    scores, ids = index.search(queries, k=10)
    brute = queries @ index.embeddings.float().T
    expected = brute.topk(10, dim=1)
    np.testing.assert_array_equal(ids, expected.indices.numpy())
    np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-5)


def test_ivfpq_index_finds_most_exact_neighbours():
    rng = np.random.default_rng(1)
    vectors = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((2000, 16), dtype=np.float32)), dim=1)
    faiss_index, settings = build_faiss_index(vectors, ivf_pq=True)
    assert settings["type"] == "ivfpq" and faiss_index.ntotal == 2000

    index = SearchIndex.from_embeddings(vectors, [f"{i}.jpg" for i in range(2000)], ivf_pq=True)
    queries = vectors[:50] + 0.05 * torch.from_numpy(rng.standard_normal((50, 16), dtype=np.float32))
    scores, ids = index.search(queries, k=10)
    exact = (queries @ index.embeddings.float().T).topk(10, dim=1).indices.numpy()
    recall = np.mean([len(set(found) & set(true)) / 10 for found, true in zip(ids, exact)])
    assert recall > 0.5, recall
    assert (ids[:, 0] == np.arange(50)).mean() > 0.8  # each perturbed vector finds its own first
    # The candidates' scores are exact inner products, best first.
    expected = torch.einsum("qd,qkd->qk", queries, index.embeddings[torch.from_numpy(ids)].float())
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_index_command_embeds_indexes_and_names_the_unreadable_image(saved, gallery, indexed):
    output, stderr = indexed
    assert "broken.jpg" in stderr and "not a readable image" in stderr
    index = load_index(output)
    assert index.info["skipped"] and "broken.jpg" in index.info["skipped"][0]
    assert index.items["path"] == [str(path) for path in sorted(gallery.glob("photo_*.png"))]
    assert index.embeddings.dtype == torch.float16 and index.embeddings.shape == (12, 16)

    model = DCLIPModel.from_pretrained(saved["student"]).eval()
    processor = DCLIPProcessor.from_pretrained(saved["student"])
    with torch.no_grad():
        pixels = processor(images=[Image.open(path).convert("RGB") for path in index.items["path"]])["pixel_values"]
        direct = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(index.embeddings.float(), direct, atol=2e-3, rtol=0)

    queries = encode_texts(model, processor, QUERIES)
    _, ids = index.search(queries, k=12)
    np.testing.assert_array_equal(ids, (queries @ index.embeddings.float().T).argsort(dim=1, descending=True).numpy())


def test_search_json_prints_ranked_paths_with_scores(saved, indexed, capsys):
    output, _ = indexed
    assert main(["search", "--index", str(output), QUERIES[1], "-k", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = printed["results"]
    assert [result["rank"] for result in results] == [1, 2, 3, 4, 5]
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True)

    index = load_index(output)
    model = DCLIPModel.from_pretrained(saved["student"]).eval()
    query = encode_texts(model, DCLIPProcessor.from_pretrained(saved["student"]), [QUERIES[1]])[0]
    expected = (index.embeddings.float() @ query).topk(5)
    assert [result["path"] for result in results] == [index.items["path"][i] for i in expected.indices.tolist()]
    np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-5)

    image_query = index.items["path"][3]
    assert main(["search", "--index", str(output), "--image", image_query, "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["path"] == image_query


def test_search_errors_name_the_problem(indexed, tmp_path, capsys):
    output, _ = indexed
    assert main(["search", "--index", str(tmp_path), "a dog"]) == 2
    assert f"{tmp_path}: not a finished index" in capsys.readouterr().err
    assert main(["search", "--index", str(output), "--image", str(tmp_path / "nope.png"), "--rerank", "x"]) == 2
    assert "--rerank needs a text query" in capsys.readouterr().err


def test_rerank_orders_candidates_by_the_teachers_pair_score(saved, indexed, store, capsys):
    output, _ = indexed
    index = load_index(output)
    teacher = DCLIPTeacherModel.from_pretrained(saved["teacher"]).eval()
    processor = DCLIPProcessor.from_pretrained(saved["teacher"])
    paths = index.items["path"]
    reranker = TeacherReranker.for_gallery(teacher, processor, paths, FeatureStore(store))
    assert list((store / "region_features").glob("*.safetensors"))  # kept for the next query

    student_model = DCLIPModel.from_pretrained(saved["student"]).eval()
    query = encode_texts(student_model, processor, [QUERIES[0]])
    _, candidates = index.search(query, k=8)
    ids, scores = reranker.rerank(QUERIES[0], candidates[0])

    # The teacher's score of each pair, straight from its forward pass over the processor's regions.
    with torch.no_grad():
        direct = []
        for item in candidates[0]:
            inputs = processor(images=[Image.open(paths[item]).convert("RGB")], text=[QUERIES[0]], regions=True)
            del inputs["pixel_values"]  # the cached image embedding is region 0, the whole image
            out = teacher(**inputs)
            direct.append(float((out.image_embeds * out.text_embeds).sum()))
    order = np.argsort(-np.array(direct), kind="stable")
    np.testing.assert_array_equal(ids, candidates[0][order])
    np.testing.assert_allclose(scores, np.array(direct)[order], atol=1e-5)
    assert list(ids) != list(candidates[0]), "the teacher should reorder this student's top-8"

    assert main(["search", "--index", str(output), QUERIES[0], "-k", "8", "--rerank", str(saved["teacher"])]
                + ["--rerank-k", "8", "--json", "--feature-store", str(store)]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)["results"]
    assert [result["id"] for result in printed] == ids.tolist()
    np.testing.assert_allclose([result["teacher_score"] for result in printed], scores, atol=1e-5)


def test_index_resumes_after_kill_9(saved, tmp_path):
    images = tmp_path / "images"
    write_gallery(images, 30, seed=3)
    arguments = ["index", "--model", str(saved["student"]), "--images", str(images), "--batch-size", "1"]
    arguments += ["--chunk-size", "1"]
    store = str(tmp_path / "store")
    chunks = f"{store}/image_embeddings/*.chunks/*.safetensors"

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_dclip.cli", *arguments, "--output", str(killed), "--feature-store", store],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not glob.glob(chunks):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(glob.glob(chunks))
    assert 0 < done_before < 30 and not (killed / "index.json").exists()

    assert main([*arguments, "--output", str(killed), "--feature-store", store]) == 0  # the same command: it resumes
    whole = tmp_path / "whole"  # an uninterrupted run, with a store of its own
    assert main([*arguments, "--output", str(whole), "--feature-store", str(tmp_path / "other-store")]) == 0
    resumed, uninterrupted = load_index(killed), load_index(whole)
    assert torch.equal(resumed.embeddings, uninterrupted.embeddings) and len(resumed) == 30
    assert resumed.items["path"] == uninterrupted.items["path"]
    assert load_file(str(killed / "embeddings.safetensors"))["embeddings"].shape == (30, 16)


def test_demo_gallery_searches_through_the_package_index(tmp_path):
    from modeling_dclip.demo import gallery as demo_gallery

    rng = np.random.default_rng(5)
    (tmp_path / "gallery").mkdir()
    for index in range(6):  # distinct colours, so that the embeddings below differ clearly
        colour = rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (16, 16, 3)).copy()).save(tmp_path / "gallery" / f"{index}.png")
    items = demo_gallery.uploaded_images(sorted((tmp_path / "gallery").glob("*.png")))
    projection = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32)

    def encode(images):
        features = np.stack([np.asarray(image.resize((2, 2)), dtype=np.float32).reshape(-1) for image in images])
        embeddings = features @ projection
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)

    gallery = demo_gallery.GalleryIndex.build(items, encode, tmp_path / "thumbnails")
    assert isinstance(gallery.index, SearchIndex)
    query = encode([Image.open(items[2].path).convert("RGB")])[0]
    hits = gallery.search(query, 4)
    expected = np.argsort(-(encode([Image.open(item.path).convert("RGB") for item in items]) @ query))[:4]
    assert [hit.item.path for hit in hits] == [items[i].path for i in expected]
    assert hits[0].item.path == items[2].path and hits[0].score == pytest.approx(1.0, abs=1e-3)
