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
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import close_session, set_client_factory
from huggingface_hub.utils._http import default_client_factory
from test_cards import build_run

from modeling_dclip.cli import main as dclip_main
from modeling_dclip.publishing.cards import write_model_cards
from modeling_dclip.publishing.push import ModelFolderError, check_model_folder, push_model_folder

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
        (lambda f: (f / "pytorch_model.bin").write_bytes(b"pickle"), "pickle files ['pytorch_model.bin']"),
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
