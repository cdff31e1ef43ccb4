"""Two-stage compression of a dual encoder ("Leaner and Faster: Two-Stage Model Compression for Lightweight Text-Image
Retrieval", Ren & Zhu, NAACL 2022):

- build a smaller student from a trained one ([`compress_student`]): transformer towers (BERT-like text encoders,
  CLIP text and vision towers) keep a subset of their layers, with those layers' weights; a timm vision tower built
  in stages (EfficientNet-Lite0) keeps a subset of each stage's blocks with their weights (`vision_blocks`), or is
  replaced by a smaller timm backbone, warm-started from every block whose weights fit;
- shrink a BERT-like text tower's word embeddings to the tokens a corpus uses ([`reduce_vocabulary`]), with a
  WordPiece tokenizer over the kept tokens, so that unseen words fall back to kept sub-words;
- stage 1 ([`COMPRESSION_STAGE1`]): each small tower learns the big model's embeddings of the same inputs
  separately — intra-modal contrastive distillation (`image_contrastive_distill`, `text_contrastive_distill`), so
  images and captions need not be paired; [`big_model_targets`] computes the targets;
- stage 2 ([`COMPRESSION_STAGE2`]): contrastive fine-tuning of the small dual encoder on pairs, to which distillation
  terms can be added (the paper adds embedding distillation from the big model and mined hard negatives).

Stage 1 on unpaired images and texts is `modeling_dclip.training.compression.distill_towers`; stage 2 and the
paired variant of stage 1 are the ordinary distillation loop run with these recipes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import timm
import torch
from torch import nn
from transformers import BertTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TimmWrapperConfig

from ..configuration_dclip import DCLIPConfig
from ..losses import register_recipe
from ..modeling_dclip import DCLIPModel

logger = logging.getLogger(__name__)

COMPRESSION_STAGE1 = {"image_contrastive_distill": 1.0, "text_contrastive_distill": 1.0}
"""Stage 1: intra-modal contrastive distillation of each tower from the big model (recipe `"compression_stage1"`)."""

COMPRESSION_STAGE2 = {"contrastive": 1.0}
"""Stage 2: contrastive fine-tuning of the small dual encoder (named recipe `"compression_stage2"`); add distillation
terms with e.g. `"compression_stage2+dclip"` or explicit weights."""

BlockSelection = str | Sequence[Sequence[int]] | None
"""Which blocks of each stage of a timm tower to keep: `None` (all), `"first"` (the first block of every stage,
which changes width and stride; the repeated residual blocks go), or explicit 0-based indices per stage, each
starting with 0."""

LayerSelection = str | int | Sequence[int] | None
"""Which transformer layers to keep: `None`/`"all"`, `"every_other"` (ending with the last layer), a number of
evenly spaced layers (ending with the last), or explicit 0-based indices."""


def select_layers(num_layers: int, keep: LayerSelection) -> list[int]:
    """The 0-based indices of the layers to keep out of `num_layers`, in order.

    `"every_other"` keeps layers 1, 3, 5, ... counted so that the last layer stays (its output feeds the pooling and
    the projection); an integer `k` keeps `k` evenly spaced layers, also ending with the last.
    """
    if keep is None or keep == "all":
        return list(range(num_layers))
    if keep == "every_other":
        return list(range(num_layers - 1, -1, -2))[::-1]
    if isinstance(keep, str):
        raise ValueError(f"layer selection must be 'all', 'every_other', a count or indices, got {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= num_layers:
            raise ValueError(f"cannot keep {keep} of {num_layers} layers")
        return [round((i + 1) * num_layers / keep) - 1 for i in range(keep)]
    indices = sorted(set(int(index) for index in keep))
    if not indices or indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(f"layer indices {list(keep)} are not a non-empty subset of 0..{num_layers - 1}")
    return indices


def layer_list_name(tower: PreTrainedModel) -> str:
    """Qualified name of the tower's stack of transformer layers (the `nn.ModuleList` of `num_hidden_layers`
    modules: `encoder.layer` in BERT, `text_model.encoder.layers` in CLIP's text tower, ...)."""
    num_layers = getattr(tower.config, "num_hidden_layers", None)
    if num_layers is None:
        raise ValueError(
            f"{type(tower).__name__} has no `num_hidden_layers`, so its layers cannot be dropped; "
            "replace a timm vision tower with a smaller one through `vision_architecture` instead"
        )
    names = [
        name
        for name, module in tower.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(names) != 1:
        raise ValueError(f"{type(tower).__name__}: expected one list of {num_layers} layers, found {names}")
    return names[0]


def _keep_layers(state: dict[str, torch.Tensor], prefix: str, keep: list[int]) -> dict[str, torch.Tensor]:
    """`state` with the layers under `prefix` (`prefix.{i}.…`) reduced to `keep`, renumbered from 0."""
    new_index = {old: new for new, old in enumerate(keep)}
    kept = {}
    for key, value in state.items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(index) in new_index:
                kept[f"{prefix}.{new_index[int(index)]}.{rest}"] = value
        else:
            kept[key] = value
    return kept


def select_blocks(stage_lengths: Sequence[int], keep: BlockSelection) -> list[list[int]]:
    """The blocks of each stage to keep, as `keep_timm_blocks` reads them (see [`BlockSelection`])."""
    if keep is None or keep == "all":
        return [list(range(length)) for length in stage_lengths]
    if keep == "first":
        return [[0] for _ in stage_lengths]
    if isinstance(keep, str):
        raise ValueError(f"block selection must be 'all', 'first' or indices per stage, got {keep!r}")
    return [[int(index) for index in stage] for stage in keep]


def _keep_stage_blocks(state: dict[str, torch.Tensor], prefix: str, kept: list[list[int]]) -> dict[str, torch.Tensor]:
    """`state` with the blocks under `prefix` (`prefix.{stage}.{block}.…`) reduced to `kept[stage]`, renumbered."""
    new_index = [{old: new for new, old in enumerate(stage)} for stage in kept]
    result = {}
    for key, value in state.items():
        if key.startswith(prefix + "."):
            stage, block, rest = key[len(prefix) + 1 :].split(".", 2)
            if int(block) in new_index[int(stage)]:
                result[f"{prefix}.{stage}.{new_index[int(stage)][int(block)]}.{rest}"] = value
        else:
            result[key] = value
    return result


def _weight_unit(key: str) -> str:
    """The block a tower weight belongs to: the path up to its last numeric component (`blocks.1.0` for
    `blocks.1.0.conv_pw.weight`), else its top-level module (`conv_stem`)."""
    parts = key.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numeric[-1] + 1]) if numeric else parts[0]


def _fitting_units(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The source tensors of every block whose tensors all exist in `target` with the same shapes — whole blocks
    only, so that no block mixes copied and fresh weights."""
    units: dict[str, list[str]] = {}
    for key in target:
        units.setdefault(_weight_unit(key), []).append(key)
    source_units: dict[str, list[str]] = {}
    for key in source:
        source_units.setdefault(_weight_unit(key), []).append(key)
    fitting = {}
    for unit, keys in units.items():
        if sorted(keys) == sorted(source_units.get(unit, [])) and all(source[k].shape == target[k].shape for k in keys):
            fitting.update({k: source[k] for k in keys})
    return fitting


def _copy_config(config):
    return type(config).from_dict(config.to_dict())


def compress_student(
    student: DCLIPModel,
    text_layers: LayerSelection = "every_other",
    vision_layers: LayerSelection = None,
    vision_architecture: str | None = None,
    vision_blocks: BlockSelection = None,
) -> DCLIPModel:
    """A smaller DCLIP student built from `student`, its kept weights copied.

    Args:
        student: the full (big) student.
        text_layers: layers of a transformer text tower to keep (see [`select_layers`]); `None` keeps the tower.
        vision_layers: layers of a transformer vision tower (CLIP's) to keep; `None` keeps the tower.
        vision_architecture: a smaller timm architecture for a timm vision tower (e.g. `"mobilenetv2_100"` in place
            of EfficientNet-Lite0); blocks whose weights fit are copied, the others start from timm's initialisation
            and are learnt in stage 1.
        vision_blocks: blocks of each stage of a timm vision tower built in stages (EfficientNet-Lite0) to keep, with
            their weights (see [`BlockSelection`]); recorded as `vision_config.kept_blocks`. Kept blocks compute what
            they did in the big tower; the tower's output changes only where dropped residual blocks added to it.

    Returns:
        A `DCLIPModel` in eval mode whose configuration describes the smaller towers, so that it saves and loads with
        `save_pretrained` / `from_pretrained` like any student. Projections and temperature are copied.
    """
    if sum(option is not None for option in (vision_layers, vision_architecture, vision_blocks)) > 1:
        raise ValueError(
            "give one of vision_layers (transformer towers), vision_architecture or vision_blocks (timm towers)"
        )
    state = student.state_dict()
    text_config, vision_config = _copy_config(student.config.text_config), _copy_config(student.config.vision_config)
    if text_layers is not None:
        layers = f"text_model.{layer_list_name(student.text_model)}"
        keep = select_layers(text_config.num_hidden_layers, text_layers)
        state = _keep_layers(state, layers, keep)
        text_config.num_hidden_layers = len(keep)
        logger.info("compress_student: text tower keeps layers %s", keep)
    if vision_layers is not None:
        layers = f"vision_model.{layer_list_name(student.vision_model)}"
        keep = select_layers(vision_config.num_hidden_layers, vision_layers)
        state = _keep_layers(state, layers, keep)
        vision_config.num_hidden_layers = len(keep)
        logger.info("compress_student: vision tower keeps layers %s", keep)
    if vision_architecture is not None:
        if vision_config.model_type != "timm_wrapper":
            raise ValueError(
                f"vision_architecture replaces timm vision towers; this one is {vision_config.model_type!r}"
            )
        vision_config = TimmWrapperConfig(architecture=vision_architecture)
    if vision_blocks is not None:
        blocks = getattr(getattr(student.vision_model, "timm_model", None), "blocks", None)
        if blocks is None:
            raise ValueError("vision_blocks needs a timm vision tower built in stages of blocks (EfficientNet)")
        kept = select_blocks([len(stage) for stage in blocks], vision_blocks)
        state = _keep_stage_blocks(state, "vision_model.timm_model.blocks", kept)
        vision_config.kept_blocks = kept
        logger.info("compress_student: vision tower keeps blocks %s", kept)
    config = DCLIPConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        projection_dim=student.config.projection_dim,
        logit_scale_init_value=student.config.logit_scale_init_value,
        vision_pooling=student.config.vision_pooling,
        text_pooling=student.config.text_pooling,
        initializer_range=student.config.initializer_range,
    )
    small = DCLIPModel(config)
    target = small.state_dict()
    if vision_architecture is None:
        mismatched = sorted(key for key in target if key not in state or state[key].shape != target[key].shape)
        if mismatched:
            raise RuntimeError(f"compress_student: no source weights for {mismatched[:5]} (of {len(mismatched)})")
        small.load_state_dict({key: state[key] for key in target})
    else:
        vision_prefix = "vision_model."
        tower = _fitting_units(
            {k[len(vision_prefix) :]: v for k, v in state.items() if k.startswith(vision_prefix)},
            {k[len(vision_prefix) :]: v for k, v in target.items() if k.startswith(vision_prefix)},
        )
        others = {
            k: v
            for k, v in state.items()
            if not k.startswith(vision_prefix) and k in target and v.shape == target[k].shape
        }
        # `DCLIPModel(config)` initialises convolutions as transformers does (normal, std 0.02), under which the
        # activations of a deep CNN fade to zero block after block; the blocks not copied start from timm's own
        # initialisation instead.
        small.vision_model.timm_model.load_state_dict(
            timm.create_model(vision_architecture, num_classes=0).state_dict()
        )
        small.load_state_dict({**others, **{vision_prefix + k: v for k, v in tower.items()}}, strict=False)
        logger.info(
            "compress_student: %s warm-started from %d of %d vision weights",
            vision_architecture,
            len(tower),
            sum(k.startswith(vision_prefix) for k in target),
        )
    return small.to(student.dtype).eval()


def vocabulary_tokens(tokenizer: PreTrainedTokenizerBase, corpus: Sequence[str]) -> list[str]:
    """The WordPiece tokens a reduced vocabulary keeps, in the original id order: the special tokens, every token of
    the tokenised `corpus`, and every printable ASCII character both as a word start (`a`) and as a continuation
    (`##a`), so that any ASCII word still splits into kept pieces instead of becoming `[UNK]`."""
    vocab = tokenizer.get_vocab()
    kept = set(tokenizer.all_special_tokens)
    for start in range(0, len(corpus), 1024):
        for ids in tokenizer(list(corpus[start : start + 1024]), add_special_tokens=False)["input_ids"]:
            kept.update(tokenizer.convert_ids_to_tokens(ids))
    characters = [chr(code) for code in range(33, 127)]
    kept.update(token for c in characters for token in (c.lower(), "##" + c.lower()) if token in vocab)
    return sorted(kept, key=vocab.__getitem__)


def reduce_vocabulary(
    model: DCLIPModel, tokenizer: PreTrainedTokenizerBase, corpus: Sequence[str]
) -> tuple[DCLIPModel, BertTokenizer]:
    """Shrink a BERT-like text tower's word embeddings to the tokens `corpus` uses ([`vocabulary_tokens`]).

    The model is changed in place: `word_embeddings [V, H]` becomes the kept rows `[V_kept, H]` and
    `text_config.vocab_size` / `pad_token_id` follow. The returned WordPiece tokenizer has the same normalisation
    and special tokens as `tokenizer` over the kept tokens only, renumbered in their original order: every word of
    `corpus` tokenises exactly as before (WordPiece's greedy longest match finds the same pieces, all kept), and an
    unseen word splits into kept sub-words, down to single characters, or becomes `[UNK]` (non-ASCII characters).

    Returns:
        `(model, reduced_tokenizer)`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordPiece":
        raise ValueError(f"reduce_vocabulary needs a WordPiece (BERT) tokenizer, got {type(tokenizer).__name__}")
    tokens = vocabulary_tokens(tokenizer, corpus)
    vocab = tokenizer.get_vocab()
    embeddings = model.text_model.get_input_embeddings()
    old_ids = torch.tensor([vocab[token] for token in tokens])
    pad_id = tokens.index(tokenizer.pad_token)
    reduced = nn.Embedding(len(tokens), embeddings.embedding_dim, padding_idx=pad_id)
    with torch.no_grad():
        reduced.weight.copy_(embeddings.weight[old_ids])
    model.text_model.set_input_embeddings(reduced.to(embeddings.weight.dtype))
    model.config.text_config.vocab_size = len(tokens)
    model.config.text_config.pad_token_id = pad_id
    reduced_tokenizer = BertTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        do_lower_case=tokenizer.do_lower_case,
        unk_token=tokenizer.unk_token,
        sep_token=tokenizer.sep_token,
        pad_token=tokenizer.pad_token,
        cls_token=tokenizer.cls_token,
        mask_token=tokenizer.mask_token,
        model_max_length=tokenizer.model_max_length,
    )
    logger.info("reduce_vocabulary: %d of %d tokens kept", len(tokens), len(vocab))
    return model, reduced_tokenizer


def unknown_token_rate(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> float:
    """The fraction of `texts`' tokens (special tokens excluded) that are `[UNK]`."""
    ids = [token for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for token in row]
    return sum(token == tokenizer.unk_token_id for token in ids) / max(1, len(ids))


def parameter_counts(model: DCLIPModel) -> dict[str, int]:
    """Parameters of a student: `vision` tower, `text` tower, `projections` (with the temperature) and `total`."""
    vision = sum(p.numel() for p in model.vision_model.parameters())
    text = sum(p.numel() for p in model.text_model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"vision": vision, "text": text, "projections": total - vision - text, "total": total}


@torch.no_grad()
def big_model_targets(
    big_model: DCLIPModel,
    pixel_values: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Stage-1 targets: the big model's projected embeddings of whichever inputs are given (images and captions
    need not be paired), as `teacher_image_embeds [B_img, P]` and `teacher_text_embeds [B_txt, P]`."""
    targets = {}
    if pixel_values is not None:
        targets["teacher_image_embeds"] = big_model.get_image_features(pixel_values=pixel_values).pooler_output
    if input_ids is not None:
        targets["teacher_text_embeds"] = big_model.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask
        ).pooler_output
    if not targets:
        raise ValueError("big_model_targets: give pixel_values, input_ids, or both")
    return targets


register_recipe("compression_stage1", COMPRESSION_STAGE1)
register_recipe("compression_stage2", COMPRESSION_STAGE2)

__all__ = [
    "COMPRESSION_STAGE1",
    "COMPRESSION_STAGE2",
    "big_model_targets",
    "compress_student",
    "layer_list_name",
    "parameter_counts",
    "reduce_vocabulary",
    "select_blocks",
    "select_layers",
    "unknown_token_rate",
    "vocabulary_tokens",
]
