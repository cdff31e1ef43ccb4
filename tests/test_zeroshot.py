"""Zero-shot classification with a tiny DCLIPModel and a real processor (CLIP image processor, BPE tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from modeling_dclip import DCLIPConfig, DCLIPModel, DCLIPProcessor
from modeling_dclip.evaluation import (
    build_zeroshot_classifier,
    get_classnames,
    get_templates,
    zeroshot_classification,
)

CLIP_TOKENIZER = SHARED / "clip-tokenizer"
CIFAR10_TEST = SHARED / "data" / "cifar10-test"


@pytest.fixture(scope="module")
def processor() -> DCLIPProcessor:
    if not (CLIP_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"CLIP tokenizer files not found under {CLIP_TOKENIZER}")
    tokenizer = CLIPTokenizer(str(CLIP_TOKENIZER / "vocab.json"), str(CLIP_TOKENIZER / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return DCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def model() -> DCLIPModel:
    torch.manual_seed(0)
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = DCLIPConfig(
        vision_config=CLIPVisionConfig(**tiny, image_size=32, patch_size=8).to_dict(),
        text_config=CLIPTextConfig(**tiny, vocab_size=49408, max_position_embeddings=77).to_dict(),
        projection_dim=16,
    )
    return DCLIPModel(config).eval()


def noise_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]
    images[-1] = images[-1].convert("L")  # the classifier must convert non-RGB images itself
    return images


def labelled_dataset(images: list[Image.Image], labels: list[int], classnames: list[str]) -> Dataset:
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=classnames)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings(model, processor):
    classnames, templates = ["cat", "dog", "traffic light"], ["a photo of a {}.", "a {} in the snow", "itap of my {}"]
    # Batches of 4 prompts straddle the classes, so a class-major / template-major mix-up shows.
    classifier = build_zeroshot_classifier(model, processor, classnames, templates, batch_size=4)
    assert classifier.shape == (3, 16)
    with torch.no_grad():
        for class_index, classname in enumerate(classnames):
            prompt_embeds = []
            for template in templates:
                inputs = processor(text=[template.replace("{}", classname)], return_tensors="pt")
                features = model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).pooler_output
                prompt_embeds.append(F.normalize(features[0], dim=-1))
            expected = F.normalize(torch.stack(prompt_embeds).mean(dim=0), dim=-1)
            torch.testing.assert_close(classifier[class_index], expected, atol=1e-5, rtol=1e-5)


def text_projection_mapping_prompts_to(model, processor, prompts: list[str], targets: torch.Tensor) -> torch.Tensor:
    """A text projection under which each prompt embeds exactly as the matching row of `targets` `[n, dim]`."""
    pooled = []
    hook = model.text_projection.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0]))
    try:
        with torch.no_grad():
            inputs = processor(text=prompts, return_tensors="pt")
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        hook.remove()
    # pooled [n, width] @ weight.T = targets; exact for n <= width (6 prompts, width 32).
    return torch.linalg.lstsq(pooled[0].double(), targets.double()).solution.T.float()


def test_each_class_embedding_equal_to_its_image_gives_perfect_top1_and_a_derangement_gives_zero(model, processor):
    classnames = get_classnames("cifar10")[:6]
    images = noise_images(6, seed=1)
    with torch.no_grad():
        pixel_values = processor(images=[image.convert("RGB") for image in images])["pixel_values"]
        image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
    cosine = F.normalize(image_embeds, dim=-1) @ F.normalize(image_embeds, dim=-1).T
    assert cosine.fill_diagonal_(0).max() < 0.9999, "the images must embed distinctly for the test to mean anything"

    original_weight = model.text_projection.weight.detach().clone()
    model.text_projection.weight.data = text_projection_mapping_prompts_to(
        model, processor, [f"a photo of a {name}." for name in classnames], image_embeds
    )
    model.train()  # the evaluation must switch dropout off and hand the model back as it found it
    try:
        matched, shifted = (
            zeroshot_classification(
                model,
                processor,
                labelled_dataset(images, labels, classnames),
                templates=["a photo of a {}."],
                batch_size=4,
            )
            for labels in ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0])
        )
        assert model.training
    finally:
        model.text_projection.weight.data = original_weight
        model.eval()
    assert matched == {"top1": 1.0, "top5": 1.0, "n": 6}
    assert shifted["top1"] == 0.0 and shifted["n"] == 6


def test_top5_is_clipped_to_the_number_of_classes(model, processor):
    images = noise_images(5, seed=2)
    dataset = labelled_dataset(images, [0, 1, 2, 0, 1], ["red", "green", "blue"])
    result = zeroshot_classification(model, processor, dataset)
    assert result["top5"] == 1.0 and result["n"] == 5
    assert 0.0 <= result["top1"] <= 1.0


@pytest.mark.skipif(not CIFAR10_TEST.is_dir(), reason=f"CIFAR-10 test images not found at {CIFAR10_TEST}")
def test_real_cifar10_images_end_to_end(model, processor):
    classnames = sorted(path.name for path in CIFAR10_TEST.iterdir() if path.is_dir())
    assert classnames == get_classnames("cifar10")
    paths, labels = [], []
    for label, classname in enumerate(classnames):
        for path in sorted((CIFAR10_TEST / classname).glob("*.jpg"))[:3]:
            paths.append(str(path))
            labels.append(label)
    dataset = labelled_dataset(paths, labels, classnames)
    result = zeroshot_classification(model, processor, dataset, templates=get_templates("cifar10"), batch_size=8)
    assert result["n"] == 30
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0


def test_bad_inputs_are_named(model, processor):
    images = noise_images(3, seed=3)
    dataset = labelled_dataset(images, [0, 1, 0], ["cat", "dog"])
    with pytest.raises(ValueError, match="no column 'picture'"):
        zeroshot_classification(model, processor, dataset, image_column="picture")
    plain_labels = Dataset.from_dict(
        {"image": images, "label": [0, 1, 5]}, features=Features({"image": ImageFeature(), "label": Value("int64")})
    )
    with pytest.raises(ValueError, match="column 'label' is not a ClassLabel feature .*pass classnames"):
        zeroshot_classification(model, processor, plain_labels)
    with pytest.raises(ValueError, match="dataset row 2: 'label' = 5 is not a class index"):
        zeroshot_classification(model, processor, plain_labels, classnames=["cat", "dog"], batch_size=2)
    with pytest.raises(ValueError, match="exactly one '{}' placeholder"):
        build_zeroshot_classifier(model, processor, ["cat"], ["a photo"])


def test_named_template_and_classname_sets():
    assert len(get_templates("cifar10")) == 18 and get_templates("cifar10") == get_templates("cifar100")
    assert len(get_templates("imagenet")) == len(set(get_templates("imagenet"))) == 80
    assert get_templates("simple") == ["a photo of a {}."]
    assert len(set(get_classnames("cifar100"))) == 100
    imagenet = get_classnames("imagenet")
    assert len(imagenet) == 1000
    assert (imagenet[0], imagenet[281], imagenet[409], imagenet[817], imagenet[999]) == (
        "tench",
        "tabby cat",
        "analog clock",
        "sports car",
        "toilet paper",
    )
    with pytest.raises(ValueError, match="Unknown template set 'mnist'"):
        get_templates("mnist")
