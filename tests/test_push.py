"""
`dclip push`: the folder checks run for real on saved model folders. The Hugging Face Hub cannot be reached from
this machine, so the upload test replaces huggingface_hub's HTTP layer (its `set_client_factory` hook) with an
in-process stand-in for the Hub's endpoints; everything above that layer (create_repo, create_branch, upload_folder,
the README metadata check, the LFS protocol, the commit payload) is huggingface_hub's own code. huggingface_hub's
Xet transfer is switched off in that test because it is Rust code that bypasses the Python HTTP layer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import close_session, set_client_factory
from huggingface_hub.utils._http import default_client_factory
from test_cards import build_run

from modeling_dclip import DCLIPProcessor
from modeling_dclip.cli import main as dclip_main
from modeling_dclip.publishing.cards import write_model_cards
from modeling_dclip.publishing.push import ModelFolderError, check_model_folder, plan_upload, push_model_folder
from modeling_dclip.regions import YoloRegionExtractor

EXPECTED_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "configuration_dclip.py",
    "modeling_dclip.py",
    "processing_dclip.py",
    "regions.py",
    "towers.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def published_run(tmp_path_factory, sample_photos) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    build_run(run_dir, sample_photos)
    write_model_cards(run_dir)
    return run_dir


@pytest.fixture
def student_folder(published_run, tmp_path) -> Path:
    folder = tmp_path / "student"
    shutil.copytree(published_run / "student", folder)
    return folder


def test_complete_folder_passes_and_caches_are_left_out(student_folder):
    (student_folder / "__pycache__").mkdir()
    (student_folder / "__pycache__" / "modeling_dclip.cpython-311.pyc").write_bytes(b"\x00")
    (student_folder / ".README.md.abc.tmp").write_text("interrupted write")
    files = dict(check_model_folder(student_folder))
    assert set(files) == EXPECTED_FILES
    assert files["model.safetensors"] == (student_folder / "model.safetensors").stat().st_size


def _remove_auto_map(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda f: (f / "README.md").unlink(), "README.md (the model card) is missing"),
        (lambda f: (f / "README.md").write_text("# no metadata\n"), "README.md: has no YAML metadata header"),
        (lambda f: (f / "modeling_dclip.py").unlink(), "modeling_dclip.py: code file missing"),
        # towers.py is not in the auto_map: only modeling_dclip.py's relative imports reveal that it is needed.
        (lambda f: (f / "towers.py").unlink(), "towers.py: code file missing"),
        (lambda f: (f / "regions.py").unlink(), "regions.py: code file missing"),
        (_remove_auto_map, "config.json has no auto_map"),
        (lambda f: (f / "processor_config.json").unlink(), "processor_config.json is missing"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer vocabulary"),
        (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    ],
)
def test_incomplete_folder_is_refused(student_folder, damage, problem, capsys):
    damage(student_folder)
    with pytest.raises(ModelFolderError) as error:
        check_model_folder(student_folder)
    assert any(problem in reported for reported in error.value.problems), error.value.problems
    # The command refuses too, before any network access, and says why.
    assert dclip_main(["push", "--model-dir", str(student_folder), "--repo-id", "org/dclip-student"]) == 2
    assert problem in capsys.readouterr().err


def test_every_problem_is_reported_at_once(student_folder):
    for name in ("README.md", "towers.py", "processor_config.json"):
        (student_folder / name).unlink()
    with pytest.raises(ModelFolderError) as error:
        check_model_folder(student_folder)
    assert len(error.value.problems) == 3


class FakeHub:
    """An in-process stand-in for the Hub endpoints that create_repo, create_branch and upload_folder call."""

    lfs_host = "lfs.hub.test"

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.validated_cards: list[str] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.authorizations: set[str] = set()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        method, path = request.method, request.url.path
        self.calls.append((method, f"{request.url.host}{path}"))
        if request.url.host == self.lfs_host and method == "PUT":
            content = request.read()
            self.lfs_objects[path.rsplit("/", 1)[1]] = content
            return httpx2.Response(200)
        if method == "GET" and path == "/api/agent-harnesses":
            # huggingface_hub's best-effort lookup for its user-agent header, not part of the upload.
            return httpx2.Response(404)
        self.authorizations.add(request.headers.get("authorization", ""))
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            self.created.append(body)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if method == "POST" and path == "/api/validate-yaml":
            self.validated_cards.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if match := re.fullmatch(r"/api/models/(.+)/branch/(.+)", path):
            self.branches.append((match[1], match[2]))
            return httpx2.Response(200, json={})
        if re.fullmatch(r"/api/models/(.+)/preupload/(.+)", path):
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                            "shouldIgnore": False,
                            "oid": None,
                        }
                        for f in files
                    ]
                },
            )
        if re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", path):
            objects = json.loads(request.content)["objects"]
            return httpx2.Response(
                200,
                json={
                    "transfer": "basic",
                    "objects": [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "authenticated": True,
                            "actions": {"upload": {"href": f"https://{self.lfs_host}/objects/{o['oid']}"}},
                        }
                        for o in objects
                    ],
                },
            )
        if match := re.fullmatch(r"/api/models/(.+)/commit/(.+)", path):
            lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
            self.commits.append({"repo_id": match[1], "revision": match[2], "lines": lines})
            return httpx2.Response(
                200,
                json={
                    "commitUrl": f"https://huggingface.co/{match[1]}/commit/{'0' * 40}",
                    "commitOid": "0" * 40,
                    "pullRequestUrl": None,
                },
            )
        return httpx2.Response(404, json={"error": f"the fake Hub has no {method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), follow_redirects=True))
    close_session()
    yield hub
    set_client_factory(default_client_factory)
    close_session()


def test_push_uploads_the_checked_folder_through_huggingface_hub(student_folder, fake_hub, capsys):
    exit_code = dclip_main(
        [
            "push",
            "--model-dir",
            str(student_folder),
            "--repo-id",
            "dclip-org/dclip-student",
            "--private",
            "--revision",
            "v1",
            "--commit-message",
            "DCLIP student, run 1",
        ]
    )
    assert exit_code == 0, capsys.readouterr().err
    assert fake_hub.created == [
        {"name": "dclip-student", "organization": "dclip-org", "visibility": "private", "type": "model"}
    ]
    assert fake_hub.branches == [("dclip-org/dclip-student", "v1")]
    assert fake_hub.authorizations == {"Bearer hf_fake_token_for_tests"}
    # The Hub's metadata check received the model card (huggingface_hub asks before hashing and before committing).
    assert fake_hub.validated_cards and set(fake_hub.validated_cards) == {(student_folder / "README.md").read_text()}

    (commit,) = fake_hub.commits
    assert (commit["repo_id"], commit["revision"]) == ("dclip-org/dclip-student", "v1")
    header = commit["lines"][0]
    assert header["key"] == "header" and header["value"]["summary"] == "DCLIP student, run 1"
    uploaded = {}
    for line in commit["lines"][1:]:
        value = line["value"]
        if line["key"] == "file":
            uploaded[value["path"]] = base64.b64decode(value["content"])
        else:
            assert line["key"] == "lfsFile"
            content = fake_hub.lfs_objects[value["oid"]]
            assert hashlib.sha256(content).hexdigest() == value["oid"]
            uploaded[value["path"]] = content
    assert set(uploaded) == EXPECTED_FILES
    for name, content in uploaded.items():
        assert content == (student_folder / name).read_bytes(), name
    assert "commit: https://huggingface.co/dclip-org/dclip-student/commit/" in capsys.readouterr().out


def test_dry_run_lists_the_files_and_makes_no_request(student_folder, fake_hub, capsys):
    assert dclip_main(["push", "--model-dir", str(student_folder), "--repo-id", "org/name", "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"would upload {len(EXPECTED_FILES)} files")
    for name in EXPECTED_FILES:
        assert f"  {name}  " in output
    assert fake_hub.calls == []


def test_push_without_a_token_says_how_to_log_in(student_folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "empty-hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "empty-hf-home" / "stored_tokens"))
    with pytest.raises(PermissionError, match="hf auth login"):
        push_model_folder(student_folder, "org/name")


def test_invalid_repo_id_is_refused(student_folder, capsys):
    assert dclip_main(["push", "--model-dir", str(student_folder), "--repo-id", "not a/valid//id"]) == 2
    assert "not a/valid//id" in capsys.readouterr().err


def _add_training_state(folder: Path) -> None:
    """What a single-stage trainer leaves in its output folder besides the model (its default work_dir)."""
    (folder / "training" / "checkpoints" / "step_2").mkdir(parents=True)
    (folder / "training" / "train_regions.safetensors").write_bytes(b"\x00" * 64)
    (folder / "training" / "checkpoints" / "step_2" / "optimizer.bin").write_bytes(b"pickle")
    (folder / "training_complete.json").write_text('{"stage": "distill_student"}')
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "extra_weights.safetensors").write_bytes(b"\x00" * 8)


def test_only_the_models_files_are_uploaded_and_the_rest_is_listed(student_folder, capsys):
    _add_training_state(student_folder)
    plan = plan_upload(student_folder)
    assert {path for path, _ in plan.files} == EXPECTED_FILES
    assert {path for path, _ in plan.excluded} == {
        "training/train_regions.safetensors",
        "training/checkpoints/step_2/optimizer.bin",
        "training_complete.json",
        "pytorch_model.bin",
        "extra_weights.safetensors",
    }
    assert dclip_main(["push", "--model-dir", str(student_folder), "--repo-id", "org/name", "--dry-run"]) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"would upload {len(EXPECTED_FILES)} files")
    left_out = output.split("left out 5 files that are not the model's (add them with --include PATTERN):\n", 1)[1]
    assert "  training/ (2 files)  " in left_out and "  pytorch_model.bin  " in left_out

    # Asked for, other files are uploaded; a pickle among them is still refused, by name.
    assert {path for path, _ in plan_upload(student_folder, include=["extra_*.safetensors"]).files} == {
        *EXPECTED_FILES,
        "extra_weights.safetensors",
    }
    with pytest.raises(ModelFolderError, match=r"pickle files \['training/checkpoints/step_2/optimizer.bin'\]"):
        plan_upload(student_folder, include=["training"])


@pytest.fixture(scope="module")
def yolo_weights(tmp_path_factory) -> Path:
    ultralytics = pytest.importorskip("ultralytics", reason="YOLO regions need the `yolo` extra")
    path = tmp_path_factory.mktemp("detector") / "scenes-yolo.pt"
    ultralytics.YOLO("yolov8n.yaml").save(path)
    return path


def test_detector_weights_travel_with_the_teacher(published_run, yolo_weights, tmp_path, sample_photos):
    teacher = tmp_path / "teacher"
    shutil.copytree(published_run / "teacher", teacher)
    processor = DCLIPProcessor.from_pretrained(teacher)
    processor.region_extractor = YoloRegionExtractor(yolo_weights, conf=0.99, imgsz=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file that exists is copied: nothing to warn about
        processor.save_pretrained(teacher)
    saved = json.loads((teacher / "processor_config.json").read_text())["region_config"]
    assert saved["weights"] == "region_detector/scenes-yolo.pt"
    assert (teacher / "region_detector" / "scenes-yolo.pt").read_bytes() == yolo_weights.read_bytes()
    assert processor.region_config["weights"] == str(yolo_weights)  # the live processor is unchanged

    # The upload carries the weights, and the uploaded files alone make a working teacher elsewhere.
    files = {path for path, _ in check_model_folder(teacher)}
    assert "region_detector/scenes-yolo.pt" in files
    elsewhere = tmp_path / "downloaded"
    for path in files:
        (elsewhere / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(teacher / path, elsewhere / path)
    yolo_weights.rename(yolo_weights.with_suffix(".moved"))  # the original path no longer exists
    try:
        reloaded = DCLIPProcessor.from_pretrained(elsewhere)
        assert reloaded.region_config["weights"] == str(elsewhere / "region_detector" / "scenes-yolo.pt")
        batch = reloaded(images=[sample_photos["coffee"]], regions=True)  # the detector runs from the copy
        assert batch["region_mask"].shape[0] == 1
    finally:
        yolo_weights.with_suffix(".moved").rename(yolo_weights)


def test_a_detector_path_of_this_machine_warns_at_save_and_stops_the_push(published_run, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(published_run / "teacher", teacher)
    processor = DCLIPProcessor.from_pretrained(teacher)
    missing = tmp_path / "gone" / "detector.pt"
    processor.region_config = {"type": "yolo", "weights": str(missing)}
    with pytest.warns(UserWarning, match=r"do not exist on this machine.*dclip push"):
        processor.save_pretrained(teacher)
    assert dclip_main(["push", "--model-dir", str(teacher), "--repo-id", "org/teacher", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert f"the region detector's weights are {str(missing)!r}, a path on this machine" in error
    assert "save_pretrained" in error


def test_push_dry_run_as_an_installed_command(published_run, tmp_path):
    """`dclip push --dry-run` from a folder outside the repository, through the console script."""
    dclip = Path(sys.executable).with_name("dclip")
    if not dclip.is_file():
        pytest.skip(f"no dclip console script beside {sys.executable}")
    result = subprocess.run(
        [str(dclip), "push", "--model-dir", str(published_run / "student"), "--repo-id", "org/name", "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"would upload {len(EXPECTED_FILES)} files")
