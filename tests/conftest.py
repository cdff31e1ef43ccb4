"""Shared fixtures: small real models built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


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
    from modeling_dclip import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPModel

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
