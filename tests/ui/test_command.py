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


def test_a_port_in_use_or_a_host_not_of_this_machine_is_one_line_naming_the_fix(tmp_path):
    """Were `[Errno 98] Address already in use` and the like, naming no fix."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["ui", "--no-browser", "--port", str(port)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.stderr.strip() == (f"Error: port {port} on 127.0.0.1 is in use (another `scenebreak ui`?): choose "
                                         "another --port, or leave --port out to take a free one")
    result = CliRunner().invoke(cli, ["ui", "--no-browser", "--host", "192.0.2.1"])  # TEST-NET-1: no machine's own
    assert result.exit_code == 2 and "--host 192.0.2.1 is not an address of this machine" in result.stderr, result.output
    assert result.stdout == ""


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])  # (SIGTERM, systemd's or kill's, killed it with no checkpoint)
def test_ctrl_c_during_learn_saves_its_checkpoint_and_leaves_nothing_else(scene_files, tiny_segmentation, tiny_model,
                                                                          tmp_path, monkeypatch, stop):
    photo, masks = scene_files["image"], scene_files["masks"]
    home = tmp_path / "ui-home"
    monkeypatch.setenv("SCENEBREAK_HOME", str(home))  # the child's scene cache
    process = start(photo, "--no-browser", "--segmenter", tiny_segmentation[1], "--base-model", tiny_model, cwd=tmp_path)
    try:
        base, token = process.stdout.readline().strip().split("/?token=")

        def post(path, body):
            request = urllib.request.Request(f"{base}{path}", json.dumps(body).encode(), method="POST",
                                             headers={"X-Scenebreak-Token": token})
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)

        def records():
            with urllib.request.urlopen(f"{base}/api/events?after=0&token={token}", timeout=120) as stream:
                for line in stream:
                    if line.startswith(b"data: "):
                        yield json.loads(line[6:])

        post("/api/open", {"path": str(photo)})
        assert [r for r in records() if r["type"] == "state"][0]["state"] == "done"
        post("/api/learn", {"masks": [str(m) for m in masks], "settings": {"steps1": "5000", "prior": False}})
        page = records()  # the page's stream, open across the stop
        next(r for r in page if r["type"] == "progress" and r["task"] == "phase 1" and r["completed"] >= 1)
        process.send_signal(getattr(signal, stop))
        # The page hears how the learn ended (its stream closed first, and the page froze).
        final = next(r for r in page if r["type"] == "state")
        assert final["state"] == "cancelled" and "--resume" in final["error"], final
        assert final["server"] == "stopped"  # (so the page says the server is gone: it said nothing more)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    last = err.strip().splitlines()[-1]
    if stop == "SIGINT":
        assert process.returncode == 130 and last == "Error: interrupted", err
    else:
        assert process.returncode == 143, err
        assert last == "Error: terminated (SIGTERM): scenebreak ui stopped; the running learn saves its checkpoint"
    assert "stopping: waiting for the running learn" in err  # (a learn still loading said nothing while waited for)
    assert (home / "checkpoints" / "photo.ckpt").is_file()  # resumable, as after Ctrl-C on the command line
    assert not list(home.rglob("*.scene")) and not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_the_browser_is_given_a_private_file_not_the_tokened_url(monkeypatch):
    """webbrowser.open(url) put the token on the browser's command line, where every user
    of the machine sees it (`ps`); the browser now gets a file only its owner reads."""
    import stat
    import webbrowser
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from scenebreak.ui.server import open_in_browser

    opened = []

    class Window(webbrowser.BackgroundBrowser):
        def open(self, url, new=0, autoraise=True):
            opened.append(url)
            return True

    monkeypatch.setattr(webbrowser, "get", lambda using=None: Window("a-browser"))
    monkeypatch.setenv("DISPLAY", ":0")
    url = "http://127.0.0.1:8765/?token=s3cret&x=<y>"
    open_in_browser(url)
    [given] = opened
    assert given.startswith("file://") and "s3cret" not in given
    page = Path(url2pathname(urlparse(given).path))
    assert stat.S_IMODE(page.stat().st_mode) == 0o600 and stat.S_IMODE(page.parent.stat().st_mode) == 0o700
    text = page.read_text()
    assert 'content="0;url=http://127.0.0.1:8765/?token=s3cret&amp;x=&lt;y&gt;"' in text


def test_no_browser_is_opened_where_it_would_take_over_the_terminal_or_write_to_stdout(monkeypatch, capfd):
    """Over ssh without a display, webbrowser ran a text browser (w3m, lynx) in the
    foreground: the server waited for it to be quit. A window's browser wrote its notes
    to stdout, which carries only the URL."""
    import sys
    import webbrowser

    from scenebreak.ui.server import open_in_browser

    if sys.platform in ("darwin", "win32"):
        pytest.skip("a Linux desktop's rules")
    opened = []

    class Text(webbrowser.GenericBrowser):
        def open(self, url, new=0, autoraise=True):
            opened.append(("text", url))
            return True

    class Window(webbrowser.BackgroundBrowser):
        def open(self, url, new=0, autoraise=True):
            os.write(1, b"Created new window in existing browser session.\n")
            opened.append(("window", url))
            return True

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(webbrowser, "get", lambda using=None: Window("a-browser"))
    open_in_browser("http://127.0.0.1:1/?token=t")
    assert opened == []  # no display: the URL printed is the way in
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(webbrowser, "get", lambda using=None: Text("w3m"))
    open_in_browser("http://127.0.0.1:1/?token=t")
    assert opened == []
    monkeypatch.setattr(webbrowser, "get", lambda using=None: Window("a-browser"))
    open_in_browser("http://127.0.0.1:1/?token=t")
    assert [kind for kind, _ in opened] == ["window"] and "Created new window" not in capfd.readouterr().out


def test_the_server_asks_for_no_address_reuse_on_windows(monkeypatch):
    """On Windows SO_REUSEADDR lets a second server bind a port that is listened on, so
    "port in use" never came and the page could reach another server."""
    from scenebreak import paths
    from scenebreak.ui.app import App
    from scenebreak.ui.server import Server

    for windows in (False, True):
        monkeypatch.setattr(paths, "ON_WINDOWS", windows)
        app = App(None)
        server = Server(app, "127.0.0.1", 0)
        try:
            reuse = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert bool(reuse) is not windows
        finally:
            server.server_close()
            app.close()


def test_the_command_lines_mask_options_and_folders_reach_the_page(scene_files, tmp_path, monkeypatch):
    """`ui --dilate 3 --keep-holes --min-area 5 --all-instances --out-dir D --base-model M`
    serve the page with those settings (what `mask` takes, the page's clicks use)."""
    import scenebreak.ui.server as server
    from scenebreak.config import MaskConfig

    served = {}
    monkeypatch.setattr(server, "serve", lambda photo, **kwargs: served.update(kwargs, photo=photo))
    result = CliRunner().invoke(cli, ["ui", str(scene_files["image"]), "--no-browser", "--dilate", "3", "--keep-holes",
                                      "--min-area", "5", "--all-instances", "--threshold", "0.4", "--out-dir",
                                      str(tmp_path / "out"), "--base-model", "some/model", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = served["mask_config"]
    assert isinstance(config, MaskConfig)
    assert (config.dilate, config.fill_holes, config.min_area, config.all_instances, config.threshold) == (
        3, False, 5, True, 0.4)
    assert Path(served["out_dir"]) == tmp_path / "out" and served["base_model"] == "some/model"
    assert served["device"] == "cpu" and Path(served["photo"]) == scene_files["image"]
