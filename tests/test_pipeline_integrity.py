"""`dclip run` reuses a finished stage only for the inputs that produced it: seed, data, config and training-code
version changes in one output folder recompute exactly what they affect and are recorded as they were; a corrupt
photo fixed in place resumes without --overwrite; the teacher's regions decide its student's targets; a second run in
the same folder is refused. Real runs on real photos (Flickr8k-1k from ../shared) with the tiny preset."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA
from safetensors import safe_open

from modeling_dclip import DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.cli import main
from modeling_dclip.data.spec import load_dataset_spec
from modeling_dclip.environment import recorded_environment
from modeling_dclip.feature_store import FeatureStore, digest, model_fingerprint
from modeling_dclip.pipeline import WORK_MARK, StageError, StageRunner
from modeling_dclip.training import TeacherConfig
from modeling_dclip.training.data import CaptionTable

FLICKR_1K = SHARED_DATA / "flickr8k-1k"
pytestmark = pytest.mark.skipif(
    not (FLICKR_1K / "dataset_flickr8k_1k.json").is_file(), reason=f"{FLICKR_1K} (shared real photos) is absent"
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A Karpathy-format subset of Flickr8k-1k, copied (16 train, 8 val, 8 test photos) so tests may damage it."""
    source = json.loads((FLICKR_1K / "dataset_flickr8k_1k.json").read_text())
    wanted = {"train": 16, "val": 8, "test": 8}
    kept = []
    for entry in source["images"]:
        if wanted.get(entry["split"], 0) > 0:
            wanted[entry["split"]] -= 1
            kept.append(entry)
    folder = tmp_path_factory.mktemp("photos")
    (folder / "images").mkdir()
    for entry in kept:
        shutil.copy(FLICKR_1K / "images" / entry["filename"], folder / "images" / entry["filename"])
    (folder / "dataset_photos.json").write_text(json.dumps({"dataset": "flickr8k", "images": kept}))
    return folder


def dclip_run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["run", "--preset", "tiny", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def record(folder: Path) -> dict:
    return json.loads((folder / "stage.json").read_text())


@pytest.mark.slow
def test_seed_config_data_and_code_version_changes_recompute_what_they_affect(photos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    common = ("--data", str(photos), "--output-dir", str(out))
    code, log, err = dclip_run(capsys, *common)
    assert code == 0, err
    first = json.loads((out / "results.json").read_text())
    assert first["stages"]["student"]["config"]["seed"] == 0

    # Another seed: every training stage and evaluation is recomputed, and says why.
    code, log, err = dclip_run(capsys, *common, "--seed", "1")
    assert code == 0, err
    for stage in ("align_base", "train_teacher", "distill_student"):
        assert re.search(rf"{stage}: inputs changed \([^)]*config\.seed", log), log
    results = json.loads((out / "results.json").read_text())
    assert {results["stages"][name]["config"]["seed"] for name in ("base", "teacher", "student")} == {1}
    assert record(out / "student")["inputs"]["config"]["seed"] == 1

    # Other loss weights: only the student (and its evaluation) is recomputed; the record holds the new weights.
    config = tmp_path / "weights.yaml"
    config.write_text(yaml.safe_dump({"distill": {"loss_weights": {"contrastive": 1.0, "image_distill": 0.5}}}))
    code, log, err = dclip_run(capsys, *common, "--seed", "1", "--config", str(config))
    assert code == 0, err
    assert "align_base: reusing" in log and "train_teacher: reusing" in log and "evaluate_teacher: reusing" in log
    assert re.search(r"distill_student: inputs changed \(config\.loss_weights", log), log
    assert "evaluate_student: inputs changed (model)" in log
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["student"]["config"]["loss_weights"] == {"contrastive": 1.0, "image_distill": 0.5}
    assert results["stages"]["teacher"]["config"]["seed"] == 1
    assert json.loads((out / "student" / "training_complete.json").read_text())["loss_weights"] == {
        "contrastive": 1.0,
        "image_distill": 0.5,
    }

    # A test photo corrupted in place: evaluation fails naming it, finished models are kept and reused.
    test_photo = next(
        photos / "images" / entry["filename"]
        for entry in json.loads((photos / "dataset_photos.json").read_text())["images"]
        if entry["split"] == "test"
    )
    original = test_photo.read_bytes()
    test_photo.write_bytes(original[: len(original) // 3])
    try:
        code, log, err = dclip_run(capsys, *common, "--seed", "1", "--config", str(config))
        assert code == 1
        assert "stage 'evaluate_base' failed" in err and test_photo.name in err
        assert "distill_student: reusing" in log
    finally:
        test_photo.write_bytes(original)
    # Fixed: the same command resumes, without --overwrite, and finishes.
    code, log, err = dclip_run(capsys, *common, "--seed", "1", "--config", str(config))
    assert code == 0, err
    assert "distill_student: reusing" in log and "evaluate_base: running" in log
    assert set(json.loads((out / "results.json").read_text())["models"]) == {"base", "teacher", "student"}

    # The student was distilled against the teacher's own regions: asking the store for the teacher's targets on
    # the training photos finds the entry the distillation wrote, keyed by the regions the teacher records.
    store = FeatureStore()
    teacher = DCLIPTeacherModel.from_pretrained(out / "teacher")
    processor = DCLIPProcessor.from_pretrained(out / "teacher")
    recorded = results["dataset"]["regions"]
    assert processor.region_config["type"] == recorded["type"] == "grid"
    assert processor.region_config["scales"] == recorded["scales"]
    train = load_dataset_spec(str(photos)).filter(lambda split: split == "train", input_columns="split")
    table = CaptionTable.from_dataset(train)
    before = sorted((store.root / "teacher_targets").glob("*.safetensors"))
    store.teacher_targets(teacher, processor, train, table.captions, table.caption_to_image)
    assert sorted((store.root / "teacher_targets").glob("*.safetensors")) == before
    # The store is shared by the whole test session: the entry of this teacher is found by its fingerprint.
    fingerprint = model_fingerprint(teacher)
    parts = []
    for path in before:
        with safe_open(str(path), "pt") as entry:
            parts.append(json.loads(entry.metadata()["parts"]))
    ours = [entry for entry in parts if entry["teacher"] == fingerprint]
    assert len(ours) == 1
    assert ours[0]["regions"]["source"]["type"] == "grid"

    # The teacher's training code changed (its version raised): the teacher and what depends on it are recomputed,
    # the base is reused; the new record carries the version.
    assert record(out / "teacher")["inputs"]["config"]["training_version"] == TeacherConfig.training_version
    monkeypatch.setattr(TeacherConfig, "training_version", TeacherConfig.training_version + 1)
    code, log, err = dclip_run(capsys, *common, "--seed", "1", "--config", str(config))
    assert code == 0, err
    assert "align_base: reusing" in log and "train_teacher: inputs changed (config.training_version)" in log
    assert re.search(r"distill_student: inputs changed \([^)]*teacher", log), log
    assert record(out / "teacher")["inputs"]["config"]["training_version"] == TeacherConfig.training_version


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "modeling_dclip.cli", "run", "--preset", "tiny", "--output-dir", str(out)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".dclip-run.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        assert lock.read_text().strip() == str(first.pid)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 3
        assert f"another dclip run (pid {first.pid})" in second.stderr and str(out) in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130 and "rerun to resume" in stderr


def test_unfinished_work_is_resumed_only_for_the_inputs_it_was_for(tmp_path):
    messages: list[str] = []
    runner = StageRunner(tmp_path / "work", messages.append)
    out, partial = tmp_path / "stage", tmp_path / "work" / "stage" / "partial"

    def stop() -> None:
        time.sleep(0.5)
        partial.write_text("an unfinished run's checkpoint")
        raise RuntimeError("stopped")

    def finish() -> None:
        out.mkdir()
        (tmp_path / "work" / "stage" / "checkpoints").mkdir()

    with pytest.raises(StageError, match="stage 'stage' failed: RuntimeError: stopped"):
        runner.run("stage", out, {"seed": 0}, stop)
    # The same inputs: the unfinished work is kept for the stage to resume from; its checkpoints go once it finishes.
    seen: list[bool] = []
    done = runner.run("stage", out, {"seed": 0}, lambda: (seen.append(partial.is_file()), finish()))
    assert seen == [True] and done["resumed"] is True
    # Its time includes the attempt before, up to the last file that attempt wrote.
    assert 0.5 <= done["seconds_before_resuming"] < 5 and done["seconds"] >= done["seconds_before_resuming"]
    assert messages[-2] == "[dclip run] stage: resuming its unfinished run (same inputs) from the files it saved"
    assert not (tmp_path / "work" / "stage" / "checkpoints").exists()
    # Other inputs after a finished run, and after an unfinished one: the work folder is emptied first.
    with pytest.raises(StageError):
        runner.run("stage", out, {"seed": 1}, stop)
    assert "inputs changed (seed)" in messages[-1]
    runner.run("stage", out, {"seed": 2}, lambda: (seen.append(partial.is_file()), finish()))
    assert seen == [True, False] and "stage: running" in messages[-2]
    assert record(out)["resumed"] is False and record(out)["inputs"] == {"seed": 2}
    assert record(out)["seconds_before_resuming"] == 0


def test_a_stage_records_the_environment_it_ran_in_outside_its_fingerprint(tmp_path):
    runner = StageRunner(tmp_path / "work", print)
    done = runner.run("new", tmp_path / "new", {"seed": 0}, (tmp_path / "new").mkdir)
    assert done["environment"] == recorded_environment()
    assert done["environment"]["torch"] == torch.__version__.split("+")[0] and done["environment"]["python"]
    # A record an earlier version wrote holds no environment: still reused for its inputs, grouped under None.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stage.json").write_text(json.dumps({"stage": "old", "fingerprint": digest({"seed": 1})}))
    again = StageRunner(tmp_path / "work", print)
    assert again.run("new", tmp_path / "new", {"seed": 0}, pytest.fail) == done
    assert "environment" not in again.run("old", tmp_path / "old", {"seed": 1}, pytest.fail)
    assert again.environments() == [
        {"environment": recorded_environment(), "stages": ["new"]},
        {"environment": None, "stages": ["old"]},
    ]


def test_an_unfinished_run_that_saved_nothing_runs_again_and_says_so(tmp_path):
    messages: list[str] = []
    runner = StageRunner(tmp_path / "work", messages.append)
    out = tmp_path / "stage"

    def fail() -> None:
        raise RuntimeError("stopped before saving anything")

    with pytest.raises(StageError):
        runner.run("stage", out, {"seed": 0}, fail)
    runner.run("stage", out, {"seed": 0}, out.mkdir)
    assert messages[-2] == "[dclip run] stage: running again (its unfinished run saved nothing to resume from)"
    assert record(out)["resumed"] is False and record(out)["seconds_before_resuming"] == 0


def test_a_killed_attempts_time_counts_up_to_the_last_file_it_wrote(tmp_path):
    """A process killed outright (SIGKILL, a session's end) writes nothing on its way out: its time is read from its
    work folder. The mark is an earlier version's (no start time), so the mark's own time is the start."""
    work = tmp_path / "work" / "stage"
    (work / "checkpoints").mkdir(parents=True)
    mark, checkpoint = work / WORK_MARK, work / "checkpoints" / "checkpoint_0"
    mark.write_text(json.dumps({"stage": "stage", "fingerprint": digest({"seed": 0})}))
    checkpoint.write_text("weights")
    now = time.time()
    os.utime(mark, (now - 100, now - 100))
    os.utime(checkpoint, (now - 40, now - 40))
    done = StageRunner(tmp_path / "work", print).run("stage", tmp_path / "stage", {"seed": 0}, lambda: None)
    assert done["resumed"] is True and done["seconds_before_resuming"] == pytest.approx(60, abs=0.1)
    assert json.loads(mark.read_text())["seconds_before"] == pytest.approx(60, abs=0.1)


@pytest.mark.slow
def test_an_interrupted_training_stage_resumes_from_its_last_checkpoint(photos, tmp_path, capsys):
    settings = tmp_path / "checkpoints.yaml"
    settings.write_text(yaml.safe_dump({"save_steps": 1, "teacher": {"num_train_epochs": 4, "batch_size": 4}}))
    out = tmp_path / "run"
    common = ("--data", str(photos), "--config", str(settings))
    # The interrupted part trains in a subprocess, the rest in this process: both compute with this process's thread
    # count, or their floating-point sums (so the weights' last digits) differ by as many steps as the subprocess ran.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "modeling_dclip.cli", "run", "--preset", "tiny", *common, "--output-dir", str(out)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second_checkpoint = out / "work" / "train_teacher" / "checkpoints" / "checkpoint_1" / "custom_checkpoint_0.pkl"
    deadline = time.time() + 300
    while not second_checkpoint.is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert "train_teacher: interrupted at step" in stderr and "rerun the same command to continue from" in stderr
    assert (out / "base" / "stage.json").is_file() and not (out / "teacher" / "stage.json").exists()

    code, log, err = dclip_run(capsys, *common, "--output-dir", str(out))
    assert code == 0, err
    assert "align_base: reusing" in log
    assert "train_teacher: resuming its unfinished run (same inputs) from its last checkpoint" in log
    assert record(out / "teacher")["resumed"] is True
    assert not (out / "work" / "train_teacher" / "checkpoints").exists()
    # Resumed exactly: the teacher is the one an uninterrupted run trains.
    code, _, err = dclip_run(capsys, *common, "--output-dir", str(tmp_path / "uninterrupted"))
    assert code == 0, err
    assert record(tmp_path / "uninterrupted" / "teacher")["fingerprint"] == record(out / "teacher")["fingerprint"]
    with (
        safe_open(str(out / "teacher" / "model.safetensors"), "pt") as resumed,
        safe_open(str(tmp_path / "uninterrupted" / "teacher" / "model.safetensors"), "pt") as uninterrupted,
    ):
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed.keys():
            torch.testing.assert_close(resumed.get_tensor(key), uninterrupted.get_tensor(key), atol=1e-6, rtol=0)
