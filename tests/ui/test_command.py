"""`scenebreak ui` as a process: the URL with its token on stdout, localhost only,
a warning for another host, and Ctrl-C ending it with exit code 130 and nothing left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from scenebreak.cli.commands import cli

SRC = Path(__file__).resolve().parents[2] / "src"


def start(*args, cwd):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "scenebreak", "ui", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ui_prints_its_url_serves_with_the_token_and_ends_on_ctrl_c(scene_files, tmp_path):
    photo = scene_files["image"]
    process = start(photo, "--no-browser", cwd=tmp_path)
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "?token=" in url
        base, token = url.split("/?token=")
        with urllib.request.urlopen(f"{base}/api/state?token={token}", timeout=30) as response:
            state = json.load(response)
        assert state["photo"] == str(photo.resolve()) and not state["ready"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/api/state", timeout=30)
        assert refused.value.code == 403
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "Error: interrupted" and "Traceback" not in err
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # the port is closed
    assert sorted(p.name for p in photo.parent.iterdir()) == ["blue.png", "photo.png", "red.png"]  # nothing written
    assert not list(tmp_path.glob("*.tmp"))


def test_ui_refuses_a_missing_photo_and_warns_for_another_host(tmp_path):
    result = CliRunner().invoke(cli, ["ui", str(tmp_path / "nope.jpg"), "--no-browser"])
    assert result.exit_code == 2 and result.stderr.strip() == f"Error: {tmp_path / 'nope.jpg'} is not a file: give the path of a photo"
    result = CliRunner().invoke(cli, ["ui", "--port", "70000"])
    assert result.exit_code == 2
    process = start("--no-browser", "--host", "0.0.0.0", cwd=tmp_path)
    try:
        assert process.stdout.readline().startswith("http://0.0.0.0:")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert "warning: listening on 0.0.0.0" in err and process.returncode == 130
