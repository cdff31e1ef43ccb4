"""Fine-tune and evaluate one student of the real-photo benchmark with the code of any checkout, from a recorded base.

Tells whether a recorded student is reproduced by the code that recorded it (and whether a later version draws it
differently) without retraining the base and teacher: the recorded base folder is linked into a new output folder and
its stage record passed on, then the checkout's own `Benchmark.finetune` and `Benchmark.evaluate` run the student
with the checkout's `DEFAULT_BUDGET` (the recorded command's; a `--budget` file is not taken). Plain fine-tuning and
Knowledge-CLIP read no teacher; the DCLIP and ConaCLIP students need `teacher` too, which this script does not link.
`--compare` compares the trained weights with a recorded student's, tensor by tensor. Example, plain fine-tuning seed
1 with the code of commit 887c73f (the one that recorded the disjoint seeds):

    git worktree add /tmp/code-887c73f 887c73f
    YOLO_OFFLINE=1 DCLIP_FEATURE_STORE=/tmp/store-887c73f python benchmarks/real_photos/reproduce_student.py \\
        --code /tmp/code-887c73f --base outputs/real_photos/disjoint/base --output-dir /tmp/plain-887c73f \\
        --data ../shared/data/flickr8k --cifar ../shared/data/cifar10-test \\
        --detector ../shared/models/yolov8n-coco-int8/yolov8n_int8.onnx --image-size 128 \\
        --name plain-lr0.0003-seed1 --seed 1 --recipe contrastive --learning-rate 3e-4 \\
        --compare outputs/real_photos/disjoint/plain-lr0.0003-seed1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", required=True, help="a checkout of this repository whose code runs the student")
    parser.add_argument("--base", required=True, help="a recorded base folder (holding its stage.json)")
    parser.add_argument("--output-dir", required=True, help="a new folder for the student and its evaluation")
    parser.add_argument("--data", required=True, help="the full Flickr8k as a Karpathy folder")
    parser.add_argument("--cifar", required=True, help="CIFAR-10 test images (imagefolder layout)")
    parser.add_argument("--detector", required=True, help="the benchmark's detector (part of its arguments)")
    parser.add_argument("--protocol", default="disjoint", choices=["disjoint", "all"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--name", required=True, help="the student's stage name, e.g. plain-lr0.0003-seed1")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--recipe", required=True, choices=["contrastive", "knowledge_clip"])
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--compare", help="a recorded student folder whose weights the new ones are compared with")
    return parser.parse_args(argv)


def compare_weights(new: Path, recorded: Path) -> str:
    """Whether two `model.safetensors` hold bitwise-equal tensors, else how many differ and by how much at most."""
    from safetensors.torch import load_file

    a, b = load_file(str(new)), load_file(str(recorded))
    if a.keys() != b.keys():
        return f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}"
    names = sorted(a)
    gaps = [(a[k] - b[k]).abs().max().item() for k in names if not a[k].equal(b[k])]
    if not gaps:
        return f"all {len(names)} tensors bitwise equal"
    return f"{len(gaps)} of {len(names)} tensors differ, by up to {max(gaps):.3g}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    code = Path(args.code).resolve()
    sys.path[:0] = [str(code), str(code / "benchmarks" / "real_photos")]
    import run_benchmark

    import modeling_dclip

    if not Path(modeling_dclip.__file__).is_relative_to(code):
        raise SystemExit(f"modeling_dclip came from {modeling_dclip.__file__}, not from --code {code}")
    base = Path(args.base).resolve()
    out = Path(args.output_dir) / args.protocol
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "base").exists():
        (out / "base").symlink_to(base, target_is_directory=True)
    bench_args = run_benchmark.parse_args(
        [
            *("--data", args.data, "--cifar", args.cifar, "--detector", args.detector),
            *("--seeds", str(args.seed), "--protocols", args.protocol, "--image-size", str(args.image_size)),
            *("--learning-rates", str(args.learning_rate), "--output-dir", args.output_dir),
        ]
    )
    bench = run_benchmark.Benchmark(bench_args, args.protocol, run_benchmark.DEFAULT_BUDGET)
    bench.records["base"] = json.loads((base / "stage.json").read_text())
    extra = {"text_teacher_model": "dclip-embedded/all-MiniLM-L6-v2"} if args.recipe == "knowledge_clip" else {}
    bench.finetune(args.name, args.seed, args.recipe, args.learning_rate, **extra)
    print(json.dumps(bench.evaluate(args.name, args.name), indent=1, sort_keys=True))
    if args.compare:
        new, recorded = out / args.name / "model.safetensors", Path(args.compare) / "model.safetensors"
        print(f"weights against {args.compare}: {compare_weights(new, recorded)}")


if __name__ == "__main__":
    main()
