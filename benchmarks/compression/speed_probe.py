"""Quick side-by-side probe used to choose the compressed towers' cut before training anything (no weights needed:
speed does not depend on them). Interleaved rounds, medians, 2 threads.

    PYTHONPATH=. python benchmarks/compression/speed_probe.py
"""

from __future__ import annotations

import statistics
import time

import timm
import torch
from transformers import AutoModel

from modeling_dclip.towers import embedded_text_path

torch.set_num_threads(2)
torch.manual_seed(0)


def pruned(kept: list[list[int]]) -> torch.nn.Module:
    model = timm.create_model("efficientnet_lite0", num_classes=0)
    for stage, indices in enumerate(kept):
        model.blocks[stage] = torch.nn.Sequential(*[model.blocks[stage][i] for i in indices])
    return model.eval()


VISION = {
    "full (1,2,2,3,3,4,1)": [[0], [0, 1], [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2, 3], [0]],
    "first of each stage (7 blocks)": [[0], [0], [0], [0], [0], [0], [0]],
    "(1,1,1,2,2,2,1)": [[0], [0], [0], [0, 2], [0, 2], [0, 3], [0]],
    "(1,1,2,2,2,2,1)": [[0], [0], [0, 1], [0, 2], [0, 2], [0, 3], [0]],
    "(1,2,1,1,1,1,1)": [[0], [0, 1], [0], [0], [0], [0], [0]],
}


def bench(fns: dict, inputs, rounds: int = 7) -> dict[str, float]:
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(inputs)
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


for size in (160, 224):
    for batch in (1, 64):
        models = {name: pruned(kept) for name, kept in VISION.items()}
        params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
        result = bench(
            {name: m for name, m in models.items()}, torch.randn(batch, 3, size, size), 5 if batch > 1 else 15
        )
        base = result["full (1,2,2,3,3,4,1)"]
        for name, value in result.items():
            print(
                f"vision {size}px b{batch} {name:32s} {value * 1000:8.1f} ms  x{base / value:.2f}  "
                f"{params[name] / 1e6:.2f} M"
            )

text = AutoModel.from_pretrained(embedded_text_path()).eval()
layers = {k: None for k in (6, 3, 2, 1)}
for k in layers:
    m = AutoModel.from_pretrained(embedded_text_path(), num_hidden_layers=k).eval()
    layers[k] = m
for batch in (1, 64):
    ids = torch.randint(1000, 20000, (batch, 16))
    mask = torch.ones_like(ids)
    result = bench(
        {k: (lambda x, m=m, mask=mask: m(input_ids=x, attention_mask=mask)) for k, m in layers.items()}, ids, 15
    )
    for k, value in result.items():
        print(f"text b{batch} {k} layers {value * 1000:8.2f} ms  x{result[6] / value:.2f}")
