"""
The teacher's region view: the regions the DCLIP teacher reads (the whole image, then detector or grid crops), drawn
on the image, with each region's attention over the caption's words (the region-to-text cross-attention of the last
fusion layer, averaged over heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

_COLOURS = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
)


@dataclass
class RegionView:
    """What the region view shows."""

    annotated: Image.Image
    words: list[str]
    # One row per region: [region name, box as text, attention (in %) over each word...]
    rows: list[list]
    pair_score: float


@torch.no_grad()
def region_view(teacher, processor, image: Image.Image, caption: str) -> RegionView:
    """
    Run the teacher on one (image, caption) pair and draw its regions with their region-to-word attention.

    Args:
        teacher: a `DCLIPTeacherModel`. processor: its `DCLIPProcessor` (with the region extractor).
        image: an RGB image. caption: the text the regions attend to.
    """
    inputs = processor(images=[image], text=[caption], regions=True, return_tensors="pt")
    outputs = teacher(**inputs, output_attentions=True)
    # [regions, tokens] for the one pair; the last layer is the one whose outputs are pooled.
    region_to_text = outputs.cross_attentions[-1][1][0]
    region_mask = inputs["region_mask"][0].bool()
    boxes = inputs["region_boxes"][0][region_mask]
    region_to_text = region_to_text[region_mask]

    token_ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    tokens = processor.tokenizer.convert_ids_to_tokens(token_ids.tolist())
    special = set(processor.tokenizer.all_special_ids)
    word_positions = [position for position, token_id in enumerate(token_ids.tolist()) if token_id not in special]
    # Attention over the caption's words only, renormalised, so special tokens do not dilute what is shown.
    word_attention = region_to_text[:, word_positions]
    word_attention = word_attention / word_attention.sum(dim=1, keepdim=True).clamp(min=1e-12)
    words = [tokens[position] for position in word_positions]

    annotated = image.copy()
    draw = ImageDraw.Draw(annotated)
    width, height = image.size
    line = max(2, round(min(width, height) / 150))
    font = ImageFont.load_default(size=max(12, round(min(width, height) / 28)))
    rows = []
    for region, (box, attention) in enumerate(zip(boxes.tolist(), word_attention)):
        name = "whole image" if region == 0 else f"region {region}"
        colour = _COLOURS[region % len(_COLOURS)]
        x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
        # The whole image is drawn inset so that its frame stays visible next to the crops that touch the border.
        inset = line * 2 if region == 0 else 0
        draw.rectangle((x1 + inset, y1 + inset, x2 - inset - 1, y2 - inset - 1), outline=colour, width=line)
        if words:
            top = int(attention.argmax())
            label = f"{name}: {words[top]} {100 * float(attention[top]):.0f}%"
        else:
            label = name
        if region == 0:
            # Bottom left, where the labels of the crops (top left of each) cannot cover it.
            text_height = draw.textbbox((0, 0), label, font=font)[3]
            position = (x1 + inset + line + 2, y2 - inset - line - 4 - text_height)
        else:
            position = (x1 + line + 2, y1 + line + 2)
        # A dark backing keeps the label readable on any image.
        draw.rectangle(draw.textbbox(position, label, font=font), fill="black")
        draw.text(position, label, fill=colour, font=font)
        rows.append(
            [name, ", ".join(f"{value:.2f}" for value in box)] + [round(100 * float(value), 1) for value in attention]
        )
    pair_score = float((outputs.image_embeds[0] * outputs.text_embeds[0]).sum())
    return RegionView(annotated=annotated, words=words, rows=rows, pair_score=pair_score)
