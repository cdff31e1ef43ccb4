"""DCLIP models: the student dual encoder (`DCLIPModel`) and the cross-modal teacher (`DCLIPTeacherModel`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, CLIPConfig, CLIPModel, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_dclip import DCLIPConfig, DCLIPTeacherConfig
from .towers import keep_timm_blocks, load_text_tower, load_vision_tower


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def symmetric_contrastive_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: mean of the text->image and image->text cross-entropies over a `[B, B]` logit matrix."""
    return (contrastive_loss(logits_per_text) + contrastive_loss(logits_per_text.t())) / 2.0


def _tower_width(tower: PreTrainedModel) -> int:
    """Width of a tower's pooled output, before projection."""
    if hasattr(tower, "timm_model"):
        return tower.timm_model.num_features
    config = tower.config
    if getattr(config, "hidden_sizes", None):
        return config.hidden_sizes[-1]
    return config.hidden_size


def _copy_dual_encoder_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy towers, projections and temperature between a `CLIPModel` and a `DCLIPModel` with CLIP towers (both
    name these parts alike, in either direction)."""
    for part in ("vision_model", "text_model", "visual_projection", "text_projection"):
        getattr(target, part).load_state_dict(getattr(source, part).state_dict())
    with torch.no_grad():
        target.logit_scale.copy_(source.logit_scale)


# Pair p = t * num_images + i reads text t and image i. Broadcasting (not indexing with repeated indices) builds the
# pairs: the backward of a repeated index accumulates with atomic adds on a multi-threaded CPU, in an order that
# varies from run to run, and made the teacher's training irreproducible; the backward of `expand` is a plain sum.
def _tile(values: torch.Tensor, times: int) -> torch.Tensor:
    """`(N, ...)` → `(times * N, ...)`: the whole of `values`, `times` times over."""
    return values.unsqueeze(0).expand(times, *values.shape).reshape(times * values.shape[0], *values.shape[1:])


def _repeat_each(values: torch.Tensor, times: int) -> torch.Tensor:
    """`(N, ...)` → `(N * times, ...)`: each row of `values` `times` times in a row."""
    return (
        values.unsqueeze(1)
        .expand(values.shape[0], times, *values.shape[1:])
        .reshape(values.shape[0] * times, *values.shape[1:])
    )


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `states [B, N, D]` over positions where `mask [B, N]` is nonzero."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


@dataclass
class DCLIPOutput(ModelOutput):
    r"""
    Output of [`DCLIPModel`], field for field as transformers' `CLIPOutput`.

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss` is `True`):
            Symmetric contrastive loss (image->text and text->image cross-entropy).
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities between image and text embeddings.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            Transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`):
            L2-normalised projected text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised projected image embeddings.
        text_model_output (`BaseModelOutputWithPooling`):
            Output of the text tower.
        vision_model_output (`BaseModelOutputWithPooling`):
            Output of the vision tower.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        return tuple(
            self[k] if k not in ["text_model_output", "vision_model_output"] else getattr(self, k).to_tuple()
            for k in self.keys()
        )


class DCLIPPreTrainedModel(PreTrainedModel):
    config: DCLIPConfig
    config_class = DCLIPConfig
    base_model_prefix = "dclip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DCLIPModel):
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5)
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class DCLIPModel(DCLIPPreTrainedModel):
    r"""
    The DCLIP student: a CLIP-style dual encoder with pluggable towers, each pooled and linearly projected into a
    shared embedding space, with a learnable temperature. Its interface is `CLIPModel`'s.

    Build it from pretrained towers with [`DCLIPModel.from_vision_text_pretrained`] (CLIP towers, any vision
    backbone, BERT-like text encoders, or the embedded offline default), or from a whole CLIP checkpoint with
    [`DCLIPModel.from_clip`]; export a student with CLIP towers back to a plain `CLIPModel` with [`to_clip`].
    """

    def __init__(
        self,
        config: DCLIPConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        if vision_model is None:
            if config.vision_config.model_type == "clip_vision_model":
                vision_model = CLIPVisionModel(config.vision_config)
            else:
                vision_model = AutoModel.from_config(config.vision_config)
                # A compressed student's timm tower keeps a subset of its blocks (two-stage compression).
                keep_timm_blocks(vision_model, getattr(config.vision_config, "kept_blocks", None))
        if text_model is None:
            text_model = AutoModel.from_config(config.text_config)
        self.vision_model = vision_model
        self.text_model = text_model
        # The towers share the composite config's sub-configs, so that edits to one are seen by the other.
        self.vision_model.config = self.config.vision_config
        self.text_model.config = self.config.text_config

        self.vision_embed_dim = _tower_width(self.vision_model)
        self.text_embed_dim = _tower_width(self.text_model)
        self.projection_dim = config.projection_dim
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        projection_dim: int = 512,
        **kwargs,
    ) -> DCLIPModel:
        r"""
        Build a student from two pretrained towers, with freshly initialised projections.

        Args:
            vision_model_name_or_path (`str`):
                Hub id or local folder of a CLIP checkpoint (its vision tower is taken), of any `AutoModel` vision
                backbone (`timm/...` ids load through `TimmWrapperModel`), or `modeling_dclip.EMBEDDED_VISION`.
            text_model_name_or_path (`str`):
                Hub id or local folder of a CLIP checkpoint (its text tower), of a BERT-like encoder (mean pooled),
                or `modeling_dclip.EMBEDDED_TEXT`.
            projection_dim (`int`, *optional*, defaults to 512):
                Dimensionality of the shared embedding space.
            kwargs:
                Other [`DCLIPConfig`] fields (`logit_scale_init_value`, `text_pooling`, ...); the remaining ones
                (`revision`, `token`, `cache_dir`, ...) go to the towers' `from_pretrained`.
        """
        config_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in DCLIPConfig.__dataclass_fields__}
        vision = load_vision_tower(vision_model_name_or_path, **kwargs)
        text = load_text_tower(text_model_name_or_path, **kwargs)
        config = DCLIPConfig(
            vision_config=vision.config.to_dict(),
            text_config=text.config.to_dict(),
            projection_dim=projection_dim,
            **config_fields,
        )
        model = cls(config)
        model.vision_model.load_state_dict(vision.state_dict())
        model.text_model.load_state_dict(text.state_dict())
        return model.eval()  # as `from_pretrained`: BatchNorm towers must not update pretrained statistics

    @classmethod
    def from_clip(cls, clip_name_or_path: str | CLIPModel, **kwargs) -> DCLIPModel:
        """A student equal to a CLIP checkpoint: towers, projections and temperature (`kwargs` go to
        `CLIPModel.from_pretrained`)."""
        clip = (
            clip_name_or_path
            if isinstance(clip_name_or_path, CLIPModel)
            else CLIPModel.from_pretrained(clip_name_or_path, **kwargs)
        )
        config = DCLIPConfig(
            vision_config=clip.config.vision_config.to_dict(),
            text_config=clip.config.text_config.to_dict(),
            projection_dim=clip.config.projection_dim,
            logit_scale_init_value=clip.config.logit_scale_init_value,
        )
        model = cls(config)
        _copy_dual_encoder_weights(clip, model)
        return model.to(clip.dtype).eval()

    def to_clip(self) -> CLIPModel:
        """This student as a plain `CLIPModel` that any CLIP tool loads without remote code (CLIP towers only)."""
        if not self.config.has_clip_towers:
            raise ValueError(
                "to_clip() needs CLIP vision and text towers; this student has "
                f"{self.config.vision_config.model_type} and {self.config.text_config.model_type}."
            )
        if (self.config.vision_pooling, self.config.text_pooling) != ("pooler", "pooler"):
            raise ValueError("to_clip() needs CLIP's own pooling (vision_pooling='pooler', text_pooling='pooler').")
        config = CLIPConfig(
            vision_config=self.config.vision_config.to_dict(),
            text_config=self.config.text_config.to_dict(),
            projection_dim=self.config.projection_dim,
            logit_scale_init_value=self.config.logit_scale_init_value,
        )
        clip = CLIPModel(config)
        _copy_dual_encoder_weights(self, clip)
        return clip.to(self.dtype)

    def pool_vision(self, outputs) -> torch.Tensor:
        r"""
        The image tower's pooled, unprojected output: `pooler_output` when `vision_pooling="pooler"` and the tower
        has one, else the mean over positions.

        Args:
            outputs: the vision tower's output (`last_hidden_state` `(batch_size, channels, height, width)` for
                convolutional backbones, `(batch_size, num_positions, hidden_size)` for transformers).

        Returns:
            `torch.FloatTensor` of shape `(batch_size, vision_width)`.
        """
        if self.config.vision_pooling == "pooler" and getattr(outputs, "pooler_output", None) is not None:
            return outputs.pooler_output.flatten(1)
        hidden = outputs.last_hidden_state
        # Convolutional backbones return [B, C, H, W]; transformers return [B, N, C].
        return hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.mean(dim=1)

    def pool_text(self, outputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
        r"""
        The text tower's pooled, unprojected output, as `text_pooling` says: `pooler`, `cls` (first token) or
        `mean` (over real tokens).

        Args:
            outputs: the text tower's output (`last_hidden_state` `(batch_size, sequence_length, hidden_size)`).
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 for real tokens.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)`.
        """
        if self.config.text_pooling == "pooler":
            return outputs.pooler_output
        hidden = outputs.last_hidden_state
        if self.config.text_pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        return _masked_mean(hidden, attention_mask)

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images as prepared by [`DCLIPProcessor`].

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is the projected, unnormalised image embedding of
            shape `(batch_size, projection_dim)`, as `CLIPModel.get_image_features` in transformers 5.
        """
        outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.visual_projection(self.pool_vision(outputs)),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids from the processor's tokenizer.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding.

        Returns:
            `BaseModelOutputWithPooling` with the token states as `last_hidden_state`
            `(batch_size, sequence_length, hidden_size)` and the projected, unnormalised text embedding as
            `pooler_output` `(batch_size, projection_dim)`.
        """
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.text_projection(self.pool_text(outputs, attention_mask)),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> DCLIPOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`):
                Token ids.
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, num_channels, height, width)`):
                Images.
            attention_mask (`torch.Tensor` of shape `(text_batch_size, sequence_length)`, *optional*):
                Text padding mask.
            return_loss (`bool`, *optional*):
                Return the symmetric contrastive loss (needs `image_batch_size == text_batch_size`).

        Returns:
            [`DCLIPOutput`].
        """
        # The processor also returns region tensors, which only the teacher reads.
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("region_")}
        vision_outputs = self.get_image_features(pixel_values=pixel_values)
        text_outputs = self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)

        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        logits_per_image = logits_per_text.t()
        loss = symmetric_contrastive_loss(logits_per_text) if return_loss else None
        return DCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )


@dataclass
class DCLIPTeacherOutput(ModelOutput):
    r"""
    Output of [`DCLIPTeacherModel`]. Row `i` of every tensor belongs to the pair (image `i`, text `i`): the
    teacher's embeddings of an image depend on the text it reads with, and the other way round.

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss` is `True`):
            Symmetric InfoNCE over the batch at the configured temperature.
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
            Enriched image embeddings against enriched text embeddings, divided by the temperature.
        logits_per_text (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
            Transpose of `logits_per_image`.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised enriched image embeddings, in the base model's embedding space.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised enriched text embeddings.
        base_image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised global image embeddings of the frozen base.
        base_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised global text embeddings of the frozen base.
        cross_attentions (`tuple` of `(text_to_region, region_to_text)` pairs, *optional*):
            Per fusion layer, head-averaged attention weights: `text_to_region` of shape
            `(batch_size, text_length, num_regions)` and `region_to_text` of shape
            `(batch_size, num_regions, text_length)`. Returned when `output_attentions=True`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    base_image_embeds: torch.FloatTensor | None = None
    base_text_embeds: torch.FloatTensor | None = None
    cross_attentions: tuple[tuple[torch.FloatTensor, torch.FloatTensor], ...] | None = None


class DCLIPBidirectionalCrossAttentionLayer(nn.Module):
    """One fusion layer: text attends to regions and regions attend to text, both from the layer's inputs, each
    stream then with residual + LayerNorm and a feed-forward block with residual + LayerNorm."""

    def __init__(self, config: DCLIPTeacherConfig):
        super().__init__()
        width, heads, dropout = config.fusion_dim, config.num_attention_heads, config.dropout
        self.text_to_region = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.region_to_text = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.text_attention_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.region_attention_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.text_mlp = self._mlp(config)
        self.region_mlp = self._mlp(config)
        self.text_mlp_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.region_mlp_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    @staticmethod
    def _mlp(config: DCLIPTeacherConfig) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(config.fusion_dim, config.intermediate_size),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.intermediate_size, config.fusion_dim),
            nn.Dropout(config.dropout),
        )

    def forward(
        self,
        text_states: torch.Tensor,
        region_states: torch.Tensor,
        text_padding: torch.Tensor,
        region_padding: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """`text_states [B, T, D]`, `region_states [B, R, D]`; paddings are True where a position is padding."""
        text_update, text_weights = self.text_to_region(
            text_states, region_states, region_states, key_padding_mask=region_padding, need_weights=output_attentions
        )
        region_update, region_weights = self.region_to_text(
            region_states, text_states, text_states, key_padding_mask=text_padding, need_weights=output_attentions
        )
        text_states = self.text_attention_norm(text_states + text_update)
        region_states = self.region_attention_norm(region_states + region_update)
        text_states = self.text_mlp_norm(text_states + self.text_mlp(text_states))
        region_states = self.region_mlp_norm(region_states + self.region_mlp(region_states))
        weights = (text_weights, region_weights) if output_attentions else None
        return text_states, region_states, weights


class DCLIPTeacherPreTrainedModel(PreTrainedModel):
    config: DCLIPTeacherConfig
    config_class = DCLIPTeacherConfig
    base_model_prefix = "dclip_teacher"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DCLIPTeacherModel):
            # Zero gates: at step 0 the teacher's embeddings are exactly its base's.
            init.zeros_(module.image_gate)
            init.zeros_(module.text_gate)
            init.constant_(module.log_inverse_temperature, math.log(1.0 / self.config.temperature))


class DCLIPTeacherModel(DCLIPTeacherPreTrainedModel):
    r"""
    The DCLIP "meta teacher": a frozen base dual encoder plus a trainable cross-modal fusion.

    Regions (the whole image first, then detector crops) are embedded by the frozen base vision tower and
    enriched with their box geometry and detector confidence; text is read as the base text tower's token
    states. Both are projected to `fusion_dim`, pass `num_fusion_layers` bidirectional cross-attention layers,
    are pooled (regions weighted by detector confidence, tokens by mean), projected back into the base
    embedding space and added to the base's global embeddings through gates that start at zero, so that the
    teacher starts exactly at its base and never worse.

    Because the enriched embeddings of an image depend on the text it is read with (and vice versa), retrieval
    with the teacher scores every (image, text) pair: see [`DCLIPTeacherModel.score_pairs`].
    """

    def __init__(self, config: DCLIPTeacherConfig, base_model: DCLIPModel | None = None):
        super().__init__(config)
        self.base = base_model if base_model is not None else DCLIPModel(config.base_config)
        self.base.config = self.config.base_config
        self.base.requires_grad_(False)
        self.base.eval()

        width, embed_dim = config.fusion_dim, config.base_config.projection_dim
        self.region_projection = nn.Linear(embed_dim, width)
        self.geometry_projection = nn.Linear(6, width) if config.use_region_geometry else None
        self.text_token_projection = nn.Linear(self.base.text_embed_dim, width)
        self.layers = nn.ModuleList(
            [DCLIPBidirectionalCrossAttentionLayer(config) for _ in range(config.num_fusion_layers)]
        )
        self.image_output_projection = nn.Linear(width, embed_dim)
        self.text_output_projection = nn.Linear(width, embed_dim)
        self.image_gate = nn.Parameter(torch.zeros(()))
        self.text_gate = nn.Parameter(torch.zeros(()))
        self.log_inverse_temperature = nn.Parameter(
            torch.tensor(math.log(1.0 / config.temperature)), requires_grad=config.learnable_temperature
        )
        self.post_init()

    @classmethod
    def from_backbone(cls, student_or_path: DCLIPModel | str, **config_overrides) -> DCLIPTeacherModel:
        """A teacher over a base dual encoder (a `DCLIPModel` or a path/Hub id of one); `config_overrides` set
        [`DCLIPTeacherConfig`] fields such as `num_fusion_layers`. A model passed in is copied, so that freezing
        it as the teacher's base neither freezes nor ties it to the student that will be trained from it."""
        if isinstance(student_or_path, DCLIPModel):
            base = copy.deepcopy(student_or_path)
        else:
            base = DCLIPModel.from_pretrained(student_or_path)
        config = DCLIPTeacherConfig(base_config=base.config.to_dict(), **config_overrides)
        return cls(config, base_model=base).eval()

    def train(self, mode: bool = True) -> DCLIPTeacherModel:
        super().train(mode)
        self.base.eval()  # the base is frozen: no dropout, no BatchNorm statistics updates
        return self

    @torch.no_grad()
    def encode_regions(self, region_pixel_values: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        r"""
        Base embeddings of region crops, the part of the teacher worth caching (the base is frozen).

        Args:
            region_pixel_values (`torch.FloatTensor` of shape `(batch_size, num_regions, 3, height, width)`)
            region_mask (`torch.Tensor` of shape `(batch_size, num_regions)`): 1 for real regions.

        Returns:
            `torch.FloatTensor` of shape `(batch_size, num_regions, projection_dim)`, L2-normalised, zero at
            padded regions.
        """
        batch, regions = region_mask.shape
        valid = region_mask.bool()
        embeds = region_pixel_values.new_zeros(batch, regions, self.config.base_config.projection_dim)
        crops = region_pixel_values[valid]
        embeds[valid] = F.normalize(self.base.get_image_features(pixel_values=crops).pooler_output, dim=-1)
        return embeds

    @torch.no_grad()
    def encode_text_tokens(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Base token states `[B, T, hidden]` and L2-normalised global text embeddings `[B, projection_dim]`."""
        outputs = self.base.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return outputs.last_hidden_state, F.normalize(outputs.pooler_output, dim=-1)

    def fuse(
        self,
        region_embeds: torch.Tensor,
        region_boxes: torch.Tensor,
        region_scores: torch.Tensor,
        region_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        text_embeds: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        r"""
        Enriched embeddings of paired inputs from base features (cached or fresh).

        Args:
            region_embeds (`(B, R, projection_dim)`): base region embeddings, see `encode_regions`.
            region_boxes (`(B, R, 4)`): normalised xyxy boxes. region_scores (`(B, R)`): detector confidence.
            region_mask (`(B, R)`): 1 for real regions.
            image_embeds (`(B, projection_dim)`): normalised base global image embeddings.
            text_states (`(B, T, hidden)`), attention_mask (`(B, T)`), text_embeds (`(B, projection_dim)`):
                see `encode_text_tokens`.

        Returns:
            `(image_embeds, text_embeds, cross_attentions)`, the embeddings L2-normalised `(B, projection_dim)`.
        """
        return self._fuse_projected(
            self._project_regions(region_embeds, region_boxes, region_scores),
            region_scores,
            region_mask,
            image_embeds,
            self.text_token_projection(text_states),
            attention_mask,
            text_embeds,
            output_attentions,
        )

    def _project_regions(
        self, region_embeds: torch.Tensor, region_boxes: torch.Tensor, region_scores: torch.Tensor
    ) -> torch.Tensor:
        """Region embeddings `(B, R, projection_dim)` with their box geometry, projected to `(B, R, fusion_dim)`."""
        regions = self.region_projection(region_embeds)
        if self.geometry_projection is not None:
            x1, y1, x2, y2 = region_boxes.unbind(-1)
            area = ((x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)).unsqueeze(-1)
            geometry = torch.cat([region_boxes, area, region_scores.unsqueeze(-1)], dim=-1)
            regions = regions + self.geometry_projection(geometry.to(regions.dtype))
        return regions

    def _fuse_projected(
        self,
        regions: torch.Tensor,
        region_scores: torch.Tensor,
        region_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        text_embeds: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """`fuse` after the input projections: `regions (B, R, fusion_dim)`, `text (B, T, fusion_dim)`."""
        region_mask = region_mask.bool()
        attention_mask = attention_mask.bool()
        attentions = []
        for layer in self.layers:
            text, regions, weights = layer(text, regions, ~attention_mask, ~region_mask, output_attentions)
            attentions.append(weights)

        region_weights = region_scores.to(regions.dtype) * region_mask
        pooled_image = _masked_mean(regions, region_weights)
        pooled_text = _masked_mean(text, attention_mask)
        enriched_image = image_embeds + self.image_gate * self.image_output_projection(pooled_image)
        enriched_text = text_embeds + self.text_gate * self.text_output_projection(pooled_text)
        return (
            F.normalize(enriched_image, dim=-1),
            F.normalize(enriched_text, dim=-1),
            tuple(attentions) if output_attentions else None,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        region_pixel_values: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_scores: torch.FloatTensor | None = None,
        region_mask: torch.Tensor | None = None,
        region_embeds: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> DCLIPTeacherOutput:
        r"""
        Enriched embeddings of `batch_size` (image, text) pairs.

        Args:
            input_ids, attention_mask (`(batch_size, text_length)`): the texts.
            pixel_values (`(batch_size, 3, H, W)`, *optional*): whole images, for the base global embedding;
                without them (nor `image_embeds`) region 0, the whole image, stands in.
            region_pixel_values (`(batch_size, num_regions, 3, H, W)`, *optional*): region crops; or give their
                cached base embeddings as `region_embeds` `(batch_size, num_regions, projection_dim)`.
            region_boxes (`(batch_size, num_regions, 4)`), region_scores, region_mask (`(batch_size, num_regions)`):
                as returned by [`DCLIPProcessor`] with `regions=True`.
            image_embeds (`(batch_size, projection_dim)`, *optional*): cached base global image embeddings.
            return_loss (`bool`, *optional*): symmetric InfoNCE over the batch at the configured temperature.
            output_attentions (`bool`, *optional*): return the head-averaged cross-attention weights.
        """
        if input_ids is None:
            raise ValueError("The teacher reads text: input_ids are required.")
        if region_mask is None or region_boxes is None:
            raise ValueError("The teacher reads regions: call the processor with regions=True.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if region_scores is None:
            region_scores = region_mask.to(torch.float32)
        if region_embeds is None:
            if region_pixel_values is None:
                raise ValueError("Give region_pixel_values (processor, regions=True) or cached region_embeds.")
            region_embeds = self.encode_regions(region_pixel_values, region_mask)
        if image_embeds is None:
            if pixel_values is not None:
                with torch.no_grad():
                    image_embeds = F.normalize(
                        self.base.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1
                    )
            else:
                image_embeds = region_embeds[:, 0]
        text_states, text_embeds = self.encode_text_tokens(input_ids, attention_mask)

        enriched_image, enriched_text, attentions = self.fuse(
            region_embeds,
            region_boxes,
            region_scores,
            region_mask,
            image_embeds,
            text_states,
            attention_mask,
            text_embeds,
            output_attentions,
        )
        logits_per_text = enriched_text @ enriched_image.t() * self.log_inverse_temperature.exp()
        return DCLIPTeacherOutput(
            loss=symmetric_contrastive_loss(logits_per_text) if return_loss else None,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            image_embeds=enriched_image,
            text_embeds=enriched_text,
            base_image_embeds=image_embeds,
            base_text_embeds=text_embeds,
            cross_attentions=attentions,
        )

    def score_pairs(
        self,
        region_embeds: torch.Tensor,
        region_boxes: torch.Tensor,
        region_scores: torch.Tensor,
        region_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        text_embeds: torch.Tensor,
        max_pairs_per_step: int = 4096,
    ) -> torch.Tensor:
        r"""
        Cosine similarity of the teacher's enriched embeddings for every (text, image) pair.

        Image arguments have a leading `num_images` dimension and text arguments a leading `num_texts` dimension,
        shaped as for [`fuse`] (use `encode_regions` / `encode_text_tokens` once, then score many pairs).

        Returns:
            `torch.FloatTensor` of shape `(num_texts, num_images)`.
        """
        num_texts, num_images = text_states.shape[0], region_embeds.shape[0]
        # Inputs are projected once per image and once per text, not once per pair; texts are taken longest first
        # so that each step trims the padding its own texts do not need.
        regions = self._project_regions(region_embeds, region_boxes, region_scores)
        positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
        lengths = (attention_mask.bool() * positions).amax(
            dim=1
        )  # up to the last real token, whatever the padding side
        order = lengths.argsort(descending=True, stable=True)
        texts_per_step = max(1, max_pairs_per_step // num_images)
        rows = []
        for start in range(0, num_texts, texts_per_step):
            text_index = order[start : start + texts_per_step]
            length = max(1, int(lengths[text_index].max()))
            text = self.text_token_projection(text_states[text_index, :length])
            count = len(text_index)
            image, text, _ = self._fuse_projected(
                _tile(regions, count),
                _tile(region_scores, count),
                _tile(region_mask, count),
                _tile(image_embeds, count),
                _repeat_each(text, num_images),
                _repeat_each(attention_mask[text_index, :length], num_images),
                _repeat_each(text_embeds[text_index], num_images),
            )
            rows.append((image * text).sum(-1).view(count, num_images))
        return torch.cat(rows)[order.argsort()]


__all__ = [
    "DCLIPModel",
    "DCLIPOutput",
    "DCLIPPreTrainedModel",
    "DCLIPTeacherModel",
    "DCLIPTeacherOutput",
    "DCLIPTeacherPreTrainedModel",
    "symmetric_contrastive_loss",
]
