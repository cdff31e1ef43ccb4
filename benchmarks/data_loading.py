"""Dataset loading time through `load_dataset_spec`, for several checkouts side by side in one run.

Each checkout is timed in its own subprocess (`PYTHONPATH=<checkout>`), with its own fresh `datasets` cache, on the
same inputs built once from Flickr8k-1k: the Karpathy folder itself, the same 5,000 captions as a JSON Lines table
and as a CSV table (one caption per row, image paths relative to the table), and the 1,000 photos as 4 webdataset
tar shards (`wds:`, only where the checkout has that kind). For each spec: the first (cold) load, and the median
of the next `--repeats` loads (`datasets` re-uses its Arrow cache for tables and shards).

    PYTHONPATH=. python benchmarks/data_loading.py --checkout before=/work/main --checkout after=. \
        --shared ../shared/data --output benchmarks/data_loading.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def build_inputs(flickr: Path, folder: Path) -> dict[str, str]:
    """Spec strings of the inputs, written under `folder`."""
    document = json.loads((flickr / "dataset_flickr8k_1k.json").read_text())
    rows = [
        {"image": f"images/{entry['filename']}", "caption": sentence["raw"], "split": entry["split"]}
        for entry in document["images"]
        for sentence in entry["sentences"]
    ]
    (folder / "images").symlink_to((flickr / "images").resolve())
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with (folder / "pairs.csv").open("w") as file:
        file.write("image,caption,split\n")
        for row in rows:
            caption = row["caption"].replace('"', '""')
            file.write(f'{row["image"]},"{caption}",{row["split"]}\n')
    shards = folder / "shards"
    shards.mkdir()
    entries = document["images"]
    for shard in range(4):
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
            for index in range(shard, len(entries), 4):
                entry = entries[index]
                key = f"{shard:05d}{index:04d}"
                members = {
                    "jpg": (flickr / "images" / entry["filename"]).read_bytes(),
                    "txt": entry["sentences"][0]["raw"].encode(),
                }
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {
        "karpathy (flickr8k-1k folder)": str(flickr),
        "jsonl (5,000 rows)": f"jsonl:{folder / 'pairs.jsonl'}",
        "csv (5,000 rows)": f"csv:{folder / 'pairs.csv'}",
        "wds (4 shards, 1,000 keys)": f"wds:{shards}/{{00000..00003}}.tar",
    }


def time_specs(specs: dict[str, str], repeats: int) -> dict[str, dict]:
    """Run inside the checkout's subprocess: cold and warm load times per spec."""
    from modeling_dclip.data.spec import KIND_OPTIONS, load_dataset_spec

    results = {}
    for name, spec in specs.items():
        if spec.partition(":")[0] not in KIND_OPTIONS and ":" in spec:
            results[name] = {"skipped": "kind not in this checkout"}
            continue
        start = time.perf_counter()
        dataset = load_dataset_spec(spec)
        cold = time.perf_counter() - start
        warm = []
        for _ in range(repeats):
            start = time.perf_counter()
            load_dataset_spec(spec)
            warm.append(time.perf_counter() - start)
        results[name] = {
            "rows": len(dataset),
            "cold_s": round(cold, 4),
            "warm_median_s": round(statistics.median(warm), 4),
            "warm_s": [round(value, 4) for value in warm],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", required=True, help="NAME=PATH of a repository checkout")
    parser.add_argument("--shared", default="../shared/data", help="folder holding flickr8k-1k/")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="write the results here as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(time_specs(json.loads(args.worker), args.repeats)))
        return

    flickr = Path(args.shared) / "flickr8k-1k"
    if not flickr.is_dir():
        sys.exit(f"{flickr} not found: pass --shared")
    with tempfile.TemporaryDirectory() as folder:
        specs = build_inputs(flickr, Path(folder))
        results = {"load_average_start": os.getloadavg()[0], "repeats": args.repeats, "checkouts": {}}
        for checkout in args.checkout:
            name, _, path = checkout.partition("=")
            environment = {
                **os.environ,
                "PYTHONPATH": str(Path(path).resolve()),
                "HF_DATASETS_CACHE": str(Path(folder) / f"cache-{name}"),
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            }
            output = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--checkout",
                    checkout,
                    "--repeats",
                    str(args.repeats),
                    "--worker",
                    json.dumps(specs),
                ],
                env=environment,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results["checkouts"][name] = {"path": path, "specs": json.loads(output.strip().splitlines()[-1])}
        results["load_average_end"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        from modeling_dclip.atomic import write_text_atomically

        write_text_atomically(args.output, text + "\n")


if __name__ == "__main__":
    main()
