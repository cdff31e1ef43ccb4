"""Two-stage compression's smaller towers: kept EfficientNet-Lite0 blocks warm-started from the big tower, the
reduced WordPiece vocabulary and its tokenizer, the parameter ratio, reloading through `AutoModel` with
`trust_remote_code` in a process without the package, and a tiny stage-1 run on unpaired images and texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import SHARED
from PIL import Image
from transformers import AutoTokenizer

from modeling_dclip import DCLIPModel, DCLIPProcessor
from modeling_dclip.feature_store import FeatureStore
from modeling_dclip.recipes import compress_student, parameter_counts, reduce_vocabulary, unknown_token_rate
from modeling_dclip.training import TowerDistillConfig, distill_towers

CORPUS = [
    "A black dog is running through the grass.",
    "Two children play soccer on a sunny field.",
    "a photo of a cat.",
    "A man in a red jacket climbs a rocky wall.",
]


@pytest.fixture(scope="module")
def compressed(embedded_student, embedded_processor):
    """The embedded student with the first block of each EfficientNet stage, MiniLM layers 1, 3, 5, and the
    vocabulary of `CORPUS`."""
    small = compress_student(embedded_student, text_layers="every_other", vision_blocks="first")
    small, tokenizer = reduce_vocabulary(small, embedded_processor.tokenizer, CORPUS)
    processor = DCLIPProcessor(
        image_processor=embedded_processor.image_processor,
        tokenizer=tokenizer,
        region_config=embedded_processor.region_config,
    )
    return small.eval(), processor


def _stem_and_first_stages(tower, pixel_values: torch.Tensor) -> torch.Tensor:
    """The timm tower up to the first block of stage 1 (the part the kept-block tower leaves unchanged)."""
    timm_model = tower.timm_model
    x = timm_model.bn1(timm_model.conv_stem(pixel_values))
    return timm_model.blocks[1][0](timm_model.blocks[0](x))


def test_kept_blocks_carry_the_source_weights_and_compute_the_same(embedded_student, compressed):
    small, _ = compressed
    big_blocks, small_blocks = embedded_student.vision_model.timm_model.blocks, small.vision_model.timm_model.blocks
    assert [len(stage) for stage in big_blocks] == [1, 2, 2, 3, 3, 4, 1]
    assert [len(stage) for stage in small_blocks] == [1] * 7
    assert small.config.vision_config.kept_blocks == [[0]] * 7
    for big_stage, small_stage in zip(big_blocks, small_blocks):
        for big_tensor, small_tensor in zip(big_stage[0].state_dict().values(), small_stage[0].state_dict().values()):
            assert torch.equal(big_tensor, small_tensor)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(
            _stem_and_first_stages(embedded_student.vision_model, pixel_values),
            _stem_and_first_stages(small.vision_model, pixel_values),
        )
        # The dropped blocks are residual: the pooled output moves, but stays close to the big tower's.
        big = embedded_student.get_image_features(pixel_values=pixel_values).pooler_output
        cut = small.get_image_features(pixel_values=pixel_values).pooler_output
    assert big.shape == cut.shape and not torch.allclose(big, cut)
    assert torch.equal(small.visual_projection.weight, embedded_student.visual_projection.weight)


def test_kept_blocks_must_start_each_stage(embedded_student):
    with pytest.raises(ValueError, match=r"kept_blocks\[1\]"):
        compress_student(embedded_student, text_layers=None, vision_blocks=[[0], [1], [0], [0], [0], [0], [0]])
    with pytest.raises(ValueError, match="one of vision_layers"):
        compress_student(embedded_student, vision_blocks="first", vision_architecture="mobilenetv2_100")


def test_reduced_vocabulary_tokenizes_the_corpus_as_before_and_falls_back_to_pieces(
    embedded_student, embedded_processor, compressed, tmp_path
):
    small, processor = compressed
    original, reduced = embedded_processor.tokenizer, processor.tokenizer
    assert 100 < len(reduced) < 300 < len(original)  # the corpus' tokens, ASCII characters (both forms), specials
    for text in CORPUS:
        assert reduced.tokenize(text) == original.tokenize(text)
    # An unseen word splits into kept pieces (down to characters); a non-ASCII character becomes [UNK].
    pieces = reduced.tokenize("zebras")
    assert len(pieces) > 1 and "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == "zebras"
    assert reduced.tokenize("東") == ["[UNK]"]
    assert unknown_token_rate(reduced, ["a zebra 東"]) == pytest.approx(1 / len(reduced.tokenize("a zebra 東")))
    # The same rows of the embedding matrix, and the same text features as the uncut text tower with those layers.
    vocab = original.get_vocab()
    ids = [reduced.convert_tokens_to_ids(t) for t in ("dog", "##s", "[CLS]")]
    old = [vocab[t] for t in ("dog", "##s", "[CLS]")]
    rows = small.text_model.get_input_embeddings().weight[ids]
    assert torch.equal(rows, embedded_student.text_model.get_input_embeddings().weight[old])
    layers_only = compress_student(embedded_student, text_layers="every_other")
    with torch.no_grad():
        expected = layers_only.get_text_features(**original(CORPUS, padding=True, return_tensors="pt")).pooler_output
        got = small.get_text_features(**reduced(CORPUS, padding=True, return_tensors="pt")).pooler_output
    torch.testing.assert_close(got, expected)
    # Saved and reloaded, the tokenizer (AutoTokenizer, the processor) stays the reduced one.
    processor.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), DCLIPProcessor.from_pretrained(tmp_path).tokenizer):
        assert len(loaded) == len(reduced)
        assert loaded("a zebra 東")["input_ids"] == reduced("a zebra 東")["input_ids"]


def test_reduce_vocabulary_rejects_a_non_wordpiece_tokenizer(embedded_student):
    from transformers import CLIPTokenizer

    folder = SHARED / "clip-tokenizer"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the shared CLIP tokenizer)")
    clip = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    with pytest.raises(ValueError, match="WordPiece"):
        reduce_vocabulary(embedded_student, clip, CORPUS)


def test_parameter_ratio_counts_what_was_removed(embedded_student, compressed):
    small, processor = compressed
    big_counts, small_counts = parameter_counts(embedded_student), parameter_counts(small)
    assert small_counts["total"] == sum(p.numel() for p in small.parameters())
    names = dict(embedded_student.named_parameters())
    dropped_blocks = sum(
        p.numel()
        for name, p in names.items()
        if name.startswith("vision_model.timm_model.blocks.") and name.split(".")[4] != "0"
    )
    dropped_layers = sum(
        p.numel() for name, p in names.items() if name.startswith("text_model.encoder.layer.") and name[25] in "024"
    )
    hidden = embedded_student.config.text_config.hidden_size
    dropped_rows = (embedded_student.config.text_config.vocab_size - len(processor.tokenizer)) * hidden
    assert small_counts["vision"] == big_counts["vision"] - dropped_blocks
    assert small_counts["text"] == big_counts["text"] - dropped_layers - dropped_rows
    assert small_counts["projections"] == big_counts["projections"]
    assert small_counts["total"] / big_counts["total"] < 0.4


ISOLATED_LOADER = r"""
import json, sys
sys.modules["modeling_dclip"] = None
import torch
from transformers import AutoModel, AutoProcessor

folder, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
torch.manual_seed(0)
pixel_values = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    image = model.get_image_features(pixel_values=pixel_values).pooler_output
    text = model.get_text_features(**processor(text=texts, return_tensors="pt", padding=True)).pooler_output
print(json.dumps({"blocks": [len(s) for s in model.vision_model.timm_model.blocks],
                  "vocabulary": len(processor.tokenizer), "image": image.tolist(), "text": text.tolist()}))
"""


def test_compressed_checkpoint_loads_through_automodel_without_the_package(compressed, tmp_path):
    small, processor = compressed
    small.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", ISOLATED_LOADER, str(tmp_path), json.dumps(CORPUS)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    assert loaded["blocks"] == [1] * 7 and loaded["vocabulary"] == len(processor.tokenizer)
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        image = small.get_image_features(pixel_values=pixel_values).pooler_output
        text = small.get_text_features(**processor(text=CORPUS, return_tensors="pt", padding=True)).pooler_output
    torch.testing.assert_close(torch.tensor(loaded["image"]), image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(loaded["text"]), text, rtol=1e-4, atol=1e-5)


def test_distill_towers_trains_a_compressed_student_on_unpaired_images_and_texts(
    embedded_student, embedded_processor, tmp_path
):
    embedded_student.save_pretrained(tmp_path / "big")
    embedded_processor.save_pretrained(tmp_path / "big")
    generator = np.random.default_rng(0)
    images = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(generator.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(8)]}
    )
    texts = CORPUS * 5  # 20 texts for 8 images: each batch of 4 images carries 10 texts
    config = TowerDistillConfig(
        output_dir=str(tmp_path / "small"),
        big_model=str(tmp_path / "big"),
        compress={"text_layers": [5], "vision_blocks": "first"},
        freeze_patterns=["vision_model.timm_model.conv_stem.*"],
        image_size=32,
        batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-3,
    )
    store = FeatureStore(tmp_path / "store")
    distill_towers(config, images, texts, store=store)
    summary = json.loads((tmp_path / "small" / "training_complete.json").read_text())
    assert summary["stage"] == "distill_towers" and summary["steps"] == 2
    assert set(summary["last_train_terms"]) == {"loss", "image_contrastive_distill", "text_contrastive_distill"}
    assert all(np.isfinite(value) for value in summary["last_train_terms"].values())
    small = DCLIPModel.from_pretrained(tmp_path / "small")
    assert small.config.text_config.num_hidden_layers == 1
    assert summary["parameters"] == parameter_counts(small)
    assert summary["vocabulary_size"] == len(DCLIPProcessor.from_pretrained(tmp_path / "small").tokenizer) < 400
    # The frozen stem kept its weights; the trained blocks moved.
    stem = "vision_model.timm_model.conv_stem.weight"
    trained = "vision_model.timm_model.blocks.5.0.conv_pw.weight"
    assert torch.equal(small.state_dict()[stem], embedded_student.state_dict()[stem])
    assert not torch.equal(small.state_dict()[trained], embedded_student.state_dict()[trained])
    with pytest.raises(ValueError, match="need a batch of images"):
        distill_towers(config, images.select(range(2)), texts, store=store)
