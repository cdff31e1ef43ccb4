"""`benchmarks/real_photos/check_rerun.py`, the issue's check of a re-run against the recorded figures, on results
files written here in `run_benchmark.py`'s schema: a figure outside the recorded std is marked and fails the check,
the environments' differences are named, and bad input is refused with the file named. (Its passing case on results
the benchmark itself made is in `tests/test_real_photo_benchmark.py`.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import REPO

CHECK = REPO / "benchmarks" / "real_photos" / "check_rerun.py"
ENVIRONMENT = {"python": "3.11.7", "torch": "2.14.1", "cpu": "AMD EPYC", "torch_threads": 2}
_spec = importlib.util.spec_from_file_location(
    "run_benchmark", REPO / "benchmarks" / "real_photos" / "run_benchmark.py"
)
run_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_benchmark)
figure = run_benchmark.mean_std  # one figure over its seeds, as the benchmark writes it


def results(models: dict[str, dict[str, dict[int, float]]], environment: dict) -> dict:
    return {
        "environment": environment,
        "protocols": {
            "disjoint": {
                "models": {
                    model: {name: figure(runs) for name, runs in figures.items()} for model, figures in models.items()
                }
            }
        },
    }


def run_check(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), *map(str, arguments)], capture_output=True, text=True, timeout=120
    )


def check(tmp_path, recorded: dict, rerun: dict, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "recorded.json").write_text(json.dumps(recorded))
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    return run_check(tmp_path / "recorded.json", tmp_path / "rerun.json", *extra)


def test_a_figure_outside_the_recorded_std_fails_the_check_and_the_environments_differences_are_named(tmp_path):
    recorded = results(
        {
            "base": {"text_to_image_R@1": {0: 0.060}, "cifar10_top1": {0: 0.339}},
            "plain fine-tuning": {"text_to_image_R@1": {0: 0.087, 1: 0.082, 2: 0.085}, "cifar10_top1": {0: 0.395}},
        },
        ENVIRONMENT,
    )
    rerun = results(
        {
            "base": {"text_to_image_R@1": {0: 0.060}, "cifar10_top1": {0: 0.339}},
            # t2i R@1 0.079 is below 0.0847 - 0.0025; CIFAR-10 has one recorded run (std 0), so any change is outside
            "plain fine-tuning": {"text_to_image_R@1": {1: 0.079}, "cifar10_top1": {1: 0.401}},
            "a model the record lacks": {"text_to_image_R@1": {1: 0.5}},
        },
        {**ENVIRONMENT, "torch": "2.15.0"},
    )
    done = check(tmp_path, recorded, rerun, "--json", str(tmp_path / "check.json"), "--output", str(tmp_path / "a.md"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "| plain fine-tuning | 1 | 8.2 / 7.9 / 8.5 ± 0.3 ✗ | – | – | – | – / 40.1 / (one run) ✗ |" in done.stdout
    assert "| base | 0 | 6.0 / 6.0 / (one run) | – | – | – | 33.9 / 33.9 / (one run) |" in done.stdout
    assert "2 of 4 figures outside the recorded std." in done.stdout
    assert (
        "Largest difference from the recorded seed: 0.30 points (plain fine-tuning, seed 1, t2i R@1);"
        " 2 of 3 figures equal to the recorded seed's (to --atol)." in done.stdout
    )
    assert "Environment: the runs differ in torch '2.14.1' → '2.15.0'." in done.stdout
    assert (tmp_path / "a.md").read_text() + "\n" == done.stdout
    rows = json.loads((tmp_path / "check.json").read_text())["protocols"]["disjoint"]
    assert [(row["model"], row["figure"], row["within"], row["equal_to_recorded_seed"]) for row in rows] == [
        ("base", "text_to_image_R@1", True, True),
        ("base", "cifar10_top1", True, True),
        ("plain fine-tuning", "text_to_image_R@1", False, False),
        ("plain fine-tuning", "cifar10_top1", False, False),  # the record has no seed 1 for it
    ]

    # Within the std (not the recorded seed's own figure): the check passes.
    rerun["protocols"]["disjoint"]["models"]["plain fine-tuning"] = {"text_to_image_R@1": figure({1: 0.086})}
    rerun["environment"] = ENVIRONMENT
    done = check(tmp_path, recorded, rerun)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 of 3 figures outside the recorded std." in done.stdout
    assert "Environment: the same in both runs." in done.stdout


def test_bad_input_is_refused_naming_the_file(tmp_path):
    recorded = results({"base": {"text_to_image_R@1": {0: 0.06}}}, ENVIRONMENT)
    missing = run_check(tmp_path / "nowhere.json", tmp_path / "nowhere.json")
    assert missing.returncode != 0 and f"{tmp_path / 'nowhere.json'} does not exist" in missing.stderr

    (tmp_path / "truncated.json").write_text('{"protocols": {')
    (tmp_path / "recorded.json").write_text(json.dumps(recorded))
    truncated = run_check(tmp_path / "recorded.json", tmp_path / "truncated.json")
    assert truncated.returncode != 0 and f"{tmp_path / 'truncated.json'} is not JSON" in truncated.stderr

    # A re-run's results from before per-seed figures were written: no silent comparison against the mean.
    old = json.loads(json.dumps(recorded))
    del old["protocols"]["disjoint"]["models"]["base"]["text_to_image_R@1"]["runs"]
    done = check(tmp_path, recorded, old)
    assert done.returncode != 0 and "has no per-seed figures (`runs`)" in done.stderr

    other = check(tmp_path, recorded, {"protocols": {"all": {"models": {}}}}, "--protocol", "all")
    assert other.returncode != 0 and "holds no protocol 'all'" in other.stderr
