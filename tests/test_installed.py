"""
What a user meets after `pip install dclip`: the installed `dclip` console script, run from a folder outside the
repository (CI installs the built wheel, not the source tree, see `.ci/run`): `dclip info`, `dclip card` and
`dclip push --dry-run` on a real `dclip run --preset tiny` output, and `dclip demo` started, queried over HTTP and
stopped with SIGTERM, after which its port is free.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import REPO, dclip_command
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw

import modeling_dclip

DEMO_START_TIMEOUT_S = 240


@pytest.fixture
def outside(tmp_path) -> Path:
    assert REPO not in tmp_path.resolve().parents
    return tmp_path


def run_dclip(*arguments: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dclip_command(), *arguments], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_console_script_runs_the_package_under_test(outside):
    script = Path(dclip_command())
    python = script.with_name("python")
    result = subprocess.run(
        [str(python), "-c", "import modeling_dclip; print(modeling_dclip.__file__)"],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert Path(result.stdout.strip()).resolve() == Path(modeling_dclip.__file__).resolve()


def test_info(outside):
    result = run_dclip("info", cwd=outside)
    assert result.returncode == 0, result.stderr
    assert f"dclip: {modeling_dclip.__version__}" in result.stdout
    assert f"torch_cpu_capability: {torch.backends.cpu.get_cpu_capability()}" in result.stdout
    towers = result.stdout.split("embedded towers:", 1)[1]
    assert "MISSING" not in towers and "vision EfficientNet-Lite0: /" in towers


def test_card_and_push_dry_run_on_a_tiny_run(tiny_run, outside):
    result = run_dclip("card", "--run", str(tiny_run), cwd=outside)
    assert result.returncode == 0, result.stderr
    results = json.loads((tiny_run / "results.json").read_text())
    for role in ("base", "teacher", "student"):
        card = ModelCard.load(tiny_run / role / "README.md")
        assert {r.metric_type: r.metric_value for r in card.data.eval_results} == results["models"][role]
        # The run started from the embedded towers: the text tower is all-MiniLM-L6-v2 on the Hub.
        assert card.data.base_model == ["sentence-transformers/all-MiniLM-L6-v2"]
        body = card.text
        assert ("| distill_student." in body) == (role == "student")
        assert str(tiny_run) not in body

    result = run_dclip(
        "push", "--model-dir", str(tiny_run / "teacher"), "--repo-id", "org/teacher", "--dry-run", cwd=outside
    )
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.split("left out", 1)[0].splitlines()[1:]]
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json", "regions.py"} <= set(listed)
    assert "training_complete.json" not in listed and not any(name.startswith("work") for name in listed)


def _gallery(folder: Path) -> Path:
    folder.mkdir()
    for name, colour in (("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220))):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill=colour)
        image.save(folder / f"{name}.png")
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _port_is_free(port: int) -> bool:
    """Nothing listens on `port`, and a server can bind it again (SO_REUSEADDR, as servers set)."""
    with socket.socket() as client:
        if client.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
    return True


def _search(url: str, query: str, k: int) -> str:
    """The status line of the demo's `/search` endpoint, called over plain HTTP (gradio's REST API)."""
    request = urllib.request.Request(
        f"{url}gradio_api/call/search",
        data=json.dumps({"data": [query, k]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/search/{event_id}", timeout=120) as response:
        stream = response.read().decode()
    assert "event: complete" in stream, stream
    data = json.loads(stream.split("event: complete", 1)[1].split("data:", 1)[1].strip().splitlines()[0])
    return data[-1]


@pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None or importlib.util.find_spec("faiss") is None,
    reason="the demo needs the `demo` extra (gradio, faiss-cpu)",
)
def test_demo_answers_over_http_and_stops_on_sigterm(tiny_run, outside):
    port = _free_port()
    log_path = outside / "demo.log"
    command = [dclip_command(), "demo", "--model", str(tiny_run / "student"), "--teacher", str(tiny_run / "teacher")]
    command += ["--gallery", str(_gallery(outside / "gallery")), "--no-sample-photos", "--port", str(port)]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=outside, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + DEMO_START_TIMEOUT_S
        while True:
            assert server.poll() is None, f"dclip demo exited with {server.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, f"no answer in {DEMO_START_TIMEOUT_S} s:\n{log_path.read_text()}"
                time.sleep(0.5)
        assert _search(url, "a red circle", 2) == "Top 2 of 3 images for “a red circle”."

        # What kill, docker stop and systemd send: the one process closes its server and exits cleanly.
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        assert _port_is_free(port)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
