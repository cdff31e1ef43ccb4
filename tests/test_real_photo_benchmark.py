"""The real-photo benchmark's own command (`benchmarks/real_photos/run_benchmark.py`) end to end on a few real
Flickr8k photos with the shared YOLO detector and a tiny budget: two seeds, one learning rate, protocol `disjoint`
and one ablation; the results' schema, a rerun of the same command that reuses every stage, and one seed re-run from
scratch elsewhere (what the README's single-seed rerun does) that reproduces that seed's figures, as
`check_rerun.py` finds; seeds run by separate commands, merged by `merge_seeds.py` into the two-seed command's
figures."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, SHARED, SHARED_DATA, karpathy_subset

SCRIPT = REPO / "benchmarks" / "real_photos" / "run_benchmark.py"
CHECK = REPO / "benchmarks" / "real_photos" / "check_rerun.py"
MERGE = REPO / "benchmarks" / "real_photos" / "merge_seeds.py"
DETECTOR = SHARED / "models" / "yolov8n-coco-int8" / "yolov8n_int8.onnx"
CIFAR = SHARED_DATA / "cifar10-test"

pytestmark = [
    pytest.mark.skipif(
        not (SHARED_DATA / "flickr8k" / "dataset_flickr8k.json").is_file() or not DETECTOR.is_file(),
        reason=f"the shared photos or detector is absent under {SHARED}",
    ),
    pytest.mark.skipif(
        __import__("importlib").util.find_spec("onnxruntime") is None, reason="onnxruntime (dclip[yolo]) is absent"
    ),
]
BUDGET = {
    "align": {"num_train_epochs": 1, "batch_size": 8, "warmup_steps": 0},
    "teacher": {
        "num_train_epochs": 1,
        "batch_size": 4,
        "warmup_steps": 0,
        "fusion_dim": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    "finetune": {"num_train_epochs": 1, "batch_size": 4, "warmup_steps": 0},
}


@pytest.mark.slow
def test_the_benchmark_runs_two_seeds_and_an_ablation_and_a_rerun_reuses_everything(tmp_path):
    data = karpathy_subset(tmp_path / "photos", {"train": 16, "val": 8, "test": 8})
    budget = tmp_path / "budget.yaml"
    budget.write_text(yaml.safe_dump(BUDGET))
    results = tmp_path / "results"

    def benchmark(seeds: list[str], ablations: list[str], output: str, results_dir: str) -> list[str]:
        return [
            *(sys.executable, str(SCRIPT), "--data", str(data), "--cifar", str(CIFAR), "--cifar-limit", "2"),
            *("--detector", str(DETECTOR), "--seeds", *seeds, "--protocols", "disjoint", "--pretrain-photos", "8"),
            *("--image-size", "64", "--learning-rates", "3e-4", "--budget", str(budget)),
            *(["--ablations", *ablations] if ablations else []),
            *("--output-dir", str(tmp_path / output), "--results-dir", str(tmp_path / results_dir)),
        ]

    command = benchmark(["0", "1"], ["regions-none"], "out", "results")
    env = {**os.environ, "YOLO_OFFLINE": "1", "DCLIP_FEATURE_STORE": str(tmp_path / "store")}
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]

    found = json.loads((results / "results.json").read_text())
    disjoint = found["protocols"]["disjoint"]
    assert disjoint["splits"] == {"pretrain": 8, "finetune": 8, "val": 8, "test": 8}
    assert disjoint["cifar_images"] == 20
    assert disjoint["learning_rates"]["DCLIP student"] == pytest.approx(3e-4)
    models = disjoint["models"]
    for label in ("plain fine-tuning", "DCLIP student", "ConaCLIP student", "Knowledge-CLIP student"):
        assert models[label]["text_to_image_R@1"]["n"] == 2, label
        assert 0 <= models[label]["text_to_image_R@1"]["mean"] <= 1
        assert models[label]["text_to_image_R@1"]["std"] >= 0
        assert set(disjoint["zeroshot_retention"][label]) == {"mean", "std", "n", "runs"}
        # Each seed's own figure beside the mean (what a re-run of one seed is checked against).
        runs = models[label]["text_to_image_R@1"]["runs"]
        assert set(runs) == {"0", "1"} and sum(runs.values()) / 2 == pytest.approx(
            models[label]["text_to_image_R@1"]["mean"]
        )
    assert models["base"]["cifar10_top1"]["n"] == 1 and "cifar10_top1" not in models["teacher"]
    assert set(models["teacher"]["text_to_image_R@1"]["runs"]) == {"0"}  # trained once, with seed 0
    assert {"DCLIP student WiSE-FT 0.5", "teacher"} <= set(models)
    # The ablation beside its reference (the protocol's own models at the first seed, unchanged).
    ablations = disjoint["ablations"]
    assert list(ablations) == ["protocol", "regions-none"]
    assert ablations["protocol"]["change"] == {"teacher": {}, "plain": True}
    assert set(ablations["protocol"]["models"]) == {"teacher", "DCLIP student", "plain fine-tuning"}
    assert ablations["protocol"]["models"]["DCLIP student"]["text_to_image_R@1"] == pytest.approx(
        json.loads(
            (
                tmp_path / "out" / "disjoint" / "work" / "evaluation" / "dclip-lr0.0003-seed0" / "metrics.json"
            ).read_text()
        )["text_to_image_R@1"]
    )
    assert set(ablations["regions-none"]["models"]) == {"teacher", "DCLIP student"}
    regions = json.loads((tmp_path / "out" / "disjoint" / "teacher-regions-none" / "stage.json").read_text())
    assert regions["inputs"]["config"]["regions"] == {"type": "grid", "scales": [2], "max_regions": 1}
    assert "### Ablations (seed 0" in (results / "results.md").read_text()
    # Where the figures were made: this command's environment, and every stage's (all of them ran in this one).
    assert found["environment"]["torch"] == importlib.metadata.version("torch")
    [group] = disjoint["environments"]
    assert group["environment"] == found["environment"]
    assert set(group["stages"]) == set(disjoint["timings_s"]) and "evaluate_teacher-regions-none" in group["stages"]
    assert f"Environment of {len(group['stages'])} stages: python " in (results / "results.md").read_text()
    assert (results / "retention_vs_recall.png").stat().st_size > 0

    # The same command again: every stage is reused, and the results are the same.
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert ": running" not in log and "reusing the finished result" in log
    again = json.loads((results / "results.json").read_text())["protocols"]["disjoint"]
    assert again["models"] == models and again["ablations"] == ablations
    # What the stages cost is their recorded seconds, not the wall time of the run that only reused them.
    assert disjoint["stages_s_total"] == pytest.approx(sum(disjoint["timings_s"].values()), abs=0.1)
    assert disjoint["stages_s_total"] > 10 and again["stages_s_total"] == disjoint["stages_s_total"]

    # One seed re-run from scratch in another output folder (base and teacher retrained too): the same figures.
    rerun = benchmark(["1"], [], "rerun", "rerun-results")
    third = subprocess.run(rerun, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    log = third.stdout + third.stderr
    assert "[dclip run] base: running" in log and "[dclip run] teacher: running" in log
    for name in ("plain", "dclip", "conaclip", "knowledge"):
        seed1 = f"{name}-lr0.0003-seed1"
        before, after = (
            json.loads((out / "disjoint" / "work" / "evaluation" / seed1 / "metrics.json").read_text())
            for out in (tmp_path / "out", tmp_path / "rerun")
        )
        figures = [key for key, value in before.items() if isinstance(value, float)]
        assert len(figures) > 10 and {key: after[key] for key in figures} == pytest.approx(
            {key: before[key] for key in figures}, abs=1e-6
        ), seed1
    # The check as its script makes it: the re-run's figures against the recorded ones, all within.
    check = subprocess.run(
        [sys.executable, str(CHECK), str(results / "results.json"), str(tmp_path / "rerun-results" / "results.json")]
        + ["--json", str(tmp_path / "check.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    rows = json.loads((tmp_path / "check.json").read_text())["protocols"]["disjoint"]
    assert {(row["model"], row["seed"]) for row in rows} >= {("base", 0), ("teacher", 0), ("DCLIP student", 1)}
    assert all(row["within"] and abs(row["rerun"] - row["recorded_seed"]) <= 1e-6 for row in rows)
    assert all(row["equal_to_recorded_seed"] for row in rows)
    assert f"0 of {len(rows)} figures outside the recorded std." in check.stdout
    assert f"{len(rows)} of {len(rows)} figures equal to the recorded seed's (to --atol)." in check.stdout
    assert "Environment: the same in both runs." in check.stdout

    # Seeds run by separate commands, merged: seed 0 alone (every stage reused) and the re-run's seed 1 (trained in
    # another output folder) give what the two-seed command gave.
    fourth = subprocess.run(benchmark(["0"], [], "out", "seed0"), env=env, capture_output=True, text=True, timeout=900)
    assert fourth.returncode == 0 and ": running" not in fourth.stdout + fourth.stderr, fourth.stderr[-3000:]
    seed0, seed1 = tmp_path / "seed0" / "results.json", tmp_path / "rerun-results" / "results.json"

    def merge(*files: object, folder: str = "merged", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        command = [sys.executable, str(MERGE), *map(str, files), *extra, "--results-dir", str(tmp_path / folder)]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    merged = merge(seed0, seed1)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "protocol 'disjoint', seeds 0, 1" in merged.stdout
    found_merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert found_merged["seeds"] == [0, 1] and [source["seeds"] for source in found_merged["sources"]] == [[0], [1]]
    both = found_merged["protocols"]["disjoint"]
    assert set(both["models"]) == set(models) and set(both["zeroshot_retention"]) == set(disjoint["zeroshot_retention"])
    for label, metrics in models.items():
        for metric, figure in metrics.items():
            assert both["models"][label][metric]["n"] == figure["n"], (label, metric)
            for key in ("mean", "std"):
                assert both["models"][label][metric][key] == pytest.approx(figure[key], abs=1e-6), (label, metric)
    for label, kept in disjoint["zeroshot_retention"].items():
        assert both["zeroshot_retention"][label]["mean"] == pytest.approx(kept["mean"], abs=1e-6), label
    sources = [json.loads(path.read_text())["protocols"]["disjoint"]["timings_s"] for path in (seed0, seed1)]
    assert both["timings_s"] == {**sources[1], **sources[0]}
    assert "(n=2)" in (tmp_path / "merged" / "results.md").read_text()

    # Refused, naming the file: a seed in two files, a file with ablations, a base that is another model, stages
    # that ran in another environment.
    again = tmp_path / "seed0-again.json"
    again.write_text(seed0.read_text())
    refused = merge(seed0, again)
    assert refused.returncode != 0 and f"' is in both {seed0} and {again}; merge files of disjoint" in refused.stderr
    refused = merge(results / "results.json", seed1)
    assert refused.returncode != 0 and f"{results / 'results.json'} holds ablations" in refused.stderr
    other = json.loads(seed1.read_text())
    other["protocols"]["disjoint"]["models"]["base"]["text_to_image_R@1"]["runs"]["0"] += 0.01
    (tmp_path / "other-base.json").write_text(json.dumps(other))
    refused = merge(seed0, tmp_path / "other-base.json")
    assert refused.returncode != 0 and "the base's text_to_image_R@1" in refused.stderr
    assert str(tmp_path / "other-base.json") in refused.stderr
    other = json.loads(seed1.read_text())
    other["protocols"]["disjoint"]["environments"][0]["environment"]["torch"] = "0.0"
    (tmp_path / "other-torch.json").write_text(json.dumps(other))
    refused = merge(seed0, tmp_path / "other-torch.json")
    assert refused.returncode != 0 and "ran in another environment" in refused.stderr
    assert "(they differ in torch)" in refused.stderr
    # Asked for, it merges them, each environment written down with the stages that ran in it.
    mixed = merge(seed0, tmp_path / "other-torch.json", folder="mixed", extra=("--allow-other-environments",))
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    groups = json.loads((tmp_path / "mixed" / "results.json").read_text())["protocols"]["disjoint"]["environments"]
    assert [group["environment"]["torch"] for group in groups] == [importlib.metadata.version("torch"), "0.0"]
    assert (
        "base" in groups[0]["stages"]
        and "base" in groups[1]["stages"]
        and "plain-lr0.0003-seed1" in groups[1]["stages"]
    )
    assert "plain-lr0.0003-seed1" not in groups[0]["stages"]
    mixed_md = (tmp_path / "mixed" / "results.md").read_text()
    assert mixed_md.count("Environment of ") == 2
    # The second line names what sets it apart, which its one-line summary would not show by itself.
    assert f"differs from the first in torch ({importlib.metadata.version('torch')} -> 0.0)" in mixed_md
