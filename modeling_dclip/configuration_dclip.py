"""Configurations of the DCLIP student (`DCLIPConfig`) and teacher (`DCLIPTeacherConfig`)."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class DCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of [`DCLIPModel`], a CLIP-style dual encoder with pluggable towers.

    The towers are any transformers models: CLIP's own vision and text towers (`clip_vision_model`,
    `clip_text_model`), a vision backbone (ViT, ConvNeXt, timm models through `timm_wrapper`, ...) and a
    BERT-like text encoder. Each tower is pooled into one vector and linearly projected into a shared space of
    `projection_dim` dimensions, as in CLIP.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the vision tower. Defaults to a `CLIPVisionConfig`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the text tower. Defaults to a `CLIPTextConfig`.
        projection_dim (`int`, *optional*, defaults to 512):
            Dimensionality of the shared image-text embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial value of the learnable log inverse temperature (CLIP's ln(1/0.07)).
        vision_pooling (`str`, *optional*):
            `"pooler"` (the tower's `pooler_output`) or `"mean"` (mean of `last_hidden_state` over positions).
            Defaults to `"pooler"` when the tower has one.
        text_pooling (`str`, *optional*):
            `"pooler"` (CLIP's end-of-text token), `"mean"` (attention-masked mean, as sentence-transformers) or
            `"cls"`. Defaults to `"pooler"` for CLIP text towers and `"mean"` otherwise.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the projections' initialisation when not loaded from a checkpoint.
    """

    model_type = "dclip"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_text_model"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    vision_pooling: Literal["pooler", "mean"] | None = None
    text_pooling: Literal["pooler", "mean", "cls"] | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_pooling is None:
            self.text_pooling = "pooler" if self.text_config.model_type == "clip_text_model" else "mean"
        if self.vision_pooling is None:
            self.vision_pooling = "pooler"
        if self.text_pooling not in ("pooler", "mean", "cls"):
            raise ValueError(f"text_pooling must be 'pooler', 'mean' or 'cls', got {self.text_pooling!r}")
        if self.vision_pooling not in ("pooler", "mean"):
            raise ValueError(f"vision_pooling must be 'pooler' or 'mean', got {self.vision_pooling!r}")

    @property
    def has_clip_towers(self) -> bool:
        """Whether both towers are CLIP's, so that the model exports to a plain `CLIPModel`."""
        return self.vision_config.model_type == "clip_vision_model" and self.text_config.model_type == "clip_text_model"


class DCLIPTeacherConfig(PreTrainedConfig):
    r"""
    Configuration of [`DCLIPTeacherModel`]: a frozen base dual encoder plus a trainable cross-modal fusion.

    Args:
        base_config (`dict` or [`DCLIPConfig`], *optional*):
            Configuration of the frozen base dual encoder whose embedding space the teacher enriches.
        fusion_dim (`int`, *optional*, defaults to 512):
            Width of the fusion transformer (the DCLIP authors use 512).
        num_fusion_layers (`int`, *optional*, defaults to 1):
            Number of bidirectional cross-attention layers (text attends to regions, regions attend to text).
        num_attention_heads (`int`, *optional*, defaults to 8):
            Attention heads in each cross-attention.
        intermediate_size (`int`, *optional*, defaults to 2048):
            Hidden size of the feed-forward blocks.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout in attention and feed-forward blocks.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the LayerNorms.
        use_region_geometry (`bool`, *optional*, defaults to `True`):
            Add an embedding of each region's box (x1, y1, x2, y2, area) and detector confidence.
        temperature (`float`, *optional*, defaults to 0.05):
            Temperature of the teacher's contrastive objective (the DCLIP authors' value).
        learnable_temperature (`bool`, *optional*, defaults to `False`):
            Learn the temperature instead of keeping it fixed.
    """

    model_type = "dclip_teacher"
    sub_configs_defaults = {"base_config": DCLIPConfig}

    base_config: dict | DCLIPConfig | None = None
    fusion_dim: int = 512
    num_fusion_layers: int = 1
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    use_region_geometry: bool = True
    temperature: float = 0.05
    learnable_temperature: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.fusion_dim % self.num_attention_heads:
            raise ValueError(
                f"fusion_dim ({self.fusion_dim}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


__all__ = ["DCLIPConfig", "DCLIPTeacherConfig"]
