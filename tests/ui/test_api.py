"""The page's HTTP API (`scenebreak ui`) on the tiny segmentation and SD models: the
token, the allowed folders, the masks equal to `scenebreak mask`'s, the command line's
one-line errors, and learn and generate with their progress streamed."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pageclient import serve, ui  # noqa: F401 (fixtures)
from scenebreak.cli.commands import cli


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def file_array(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def open_photo(ui, photo) -> list[dict]:
    ui.ok("/api/open", {"path": str(photo)})
    records = ui.wait()
    assert records[-1]["state"] == "done", records[-1]
    return records


def cli_masks(photo, out_dir, models, *args) -> list:
    detector, segmenter = models
    result = CliRunner().invoke(cli, ["mask", str(photo), "--out-dir", str(out_dir), "--detector", str(detector),
                                      "--segmenter", str(segmenter), "--threshold", "0", "-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    return [file_array(line) for line in result.stdout.splitlines()]


def test_the_token_is_needed_on_every_request(ui):
    for path in ("/", "/api/state", "/static/app.js", "/api/scenes", "/api/events"):
        status, body, _ = ui.call(path, token=False)
        assert status == 403 and b"no valid token" in body, (path, status)
    status, body, _ = ui.call("/api/state", token=False, headers={"X-Scenebreak-Token": "guess"})
    assert status == 403
    status, body = ui.json("/api/open", {"path": "photo.png"}, token=False)
    assert status == 403 and ui.server.app.job is None  # refused before anything ran
    # The printed URL carries it: the page, its script and style load with it, and the page passes it on.
    status, page, headers = ui.call("/?token=" + ui.server.token, token=False)
    assert status == 200 and ui.server.token.encode() in page and "default-src 'self'" in headers["Content-Security-Policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert ui.call(f"{asset}?token={ui.server.token}", token=False)[0] == 200
    # ...but an action needs it in its header: a URL from the browser's history changes nothing.
    status, body = ui.json(f"/api/open?token={ui.server.token}", {"path": "photo.png"}, token=False)
    assert status == 403 and ui.server.app.job is None
    # A name that points at 127.0.0.1 from someone else's page is refused, token or not.
    status, body, _ = ui.call("/api/state", headers={"Host": f"evil.example:{ui.server.server_address[1]}"})
    assert status == 403 and b"evil.example" in body


def test_a_refused_request_closes_its_connection(ui):
    """As docs/ui.md says: a GET refused for its token left the connection open for the
    next guess (hundreds a second on one connection)."""
    import socket

    host, port = ui.server.server_address[:2]
    guess = "GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Scenebreak-Token: {}\r\n\r\n"
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall((guess.format("guess-1") + guess.format("guess-2")).encode())  # two on one connection
        received = b""
        while chunk := sock.recv(65536):  # until the server closes it
            received += chunk
    assert received.count(b"HTTP/1.") == 1 and b"403" in received.split(b"\r\n")[0]
    assert b"Connection: close" in received


def test_paths_outside_the_allowed_folders_are_refused(ui, scene_files, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    folder = scene_files["image"].parent
    os.symlink(secret, folder / "link.png")  # a link inside that leads outside
    for path in (secret, "../outside/secret.png", "link.png", "/etc/passwd"):
        status, data = ui.json(f"/api/file?path={path}")
        assert status == 403 and "outside the folders" in data["error"], (path, data)
        status, data = ui.json("/api/open", {"path": str(path)})
        assert status == 403, (path, data)
    # Inside: the photo itself, by name or path; never a file that is not an image.
    assert ui.call("/api/file?path=photo.png")[0] == 200
    (folder / "notes.txt").write_text("hello")
    status, data = ui.json("/api/file?path=notes.txt")
    assert status == 400 and "not an image" in data["error"]
    open_photo(ui, scene_files["image"])
    ui.ok("/api/mask", {"id": "a", "points": [[20, 20]]})
    status, data = ui.json("/api/save", {"objects": [{"id": "a", "name": "red"}], "out_dir": str(outside)})
    assert status == 403 and not list(outside.glob("*.mask*"))
    status, data = ui.json("/api/learn", {"masks": [str(secret)]})
    assert status == 403


def test_a_click_gives_the_mask_that_mask_point_gives(ui, scene_files, tiny_segmentation, tmp_path):
    photo = scene_files["image"]
    records = open_photo(ui, photo)
    # The embedding's progress came through the stream, from the library's own records.
    assert {"type": "progress", "task": "embedding the photo", "completed": 1, "total": 1} in \
        [{k: r.get(k) for k in ("type", "task", "completed", "total")} for r in records]
    state = ui.ok("/api/state")
    assert state["ready"] and state["size"] == [96, 80]

    one = ui.ok("/api/mask", {"id": "1", "points": [[20, 20]]})
    two = ui.ok("/api/mask", {"id": "2", "points": [[60, 50], [70, 60]], "labels": [1, 1]})
    box = ui.ok("/api/mask", {"id": "3", "box": [52, 42, 84, 74]})
    for answer in (one, two, box):
        mask = png_array(base64.b64decode(answer["png"]))
        assert mask.shape == (80, 96) and set(np.unique(mask)) <= {0, 255} and (mask > 0).sum() == answer["area"] > 0
    run = ui.ok("/api/save", {"objects": [{"id": "1", "name": "red"}, {"id": "2", "name": "blue"}, {"id": "3", "name": "boxed"}]})
    assert [os.path.basename(m["path"]) for m in run["masks"]] == ["photo.mask1.png", "photo.mask2.png", "photo.mask3.png"]
    assert [m["label"] for m in run["masks"]] == ["red", "blue", "boxed"]
    assert os.path.dirname(run["masks"][0]["path"]) == str(photo.parent.resolve()) and os.path.exists(run["preview"])
    saved = [file_array(m["path"]) for m in run["masks"]]
    assert not np.array_equal(saved[0], saved[2])  # different prompts, different masks: the comparisons below mean something
    # The same clicks and box on the command line give the same pixels.
    assert np.array_equal(saved[0], cli_masks(photo, tmp_path / "a", tiny_segmentation, "--point", "20,20")[0])
    assert np.array_equal(saved[1], cli_masks(photo, tmp_path / "b", tiny_segmentation, "--point", "60,50",
                                              "--point", "70,60", "--group")[0])
    assert np.array_equal(saved[2], cli_masks(photo, tmp_path / "c", tiny_segmentation, "--box", "52,42,84,74")[0])
    assert np.array_equal(png_array(base64.b64decode(one["png"])), saved[0])
    # A click beside the object is --exclude.
    beside = ui.ok("/api/mask", {"id": "1", "points": [[20, 20], [60, 50], [40, 36]], "labels": [1, 1, 0]})
    assert np.array_equal(png_array(base64.b64decode(beside["png"])), cli_masks(
        photo, tmp_path / "e", tiny_segmentation, "--point", "20,20", "--point", "60,50", "--exclude", "40,36", "--group")[0])
    # Words go through the detector, as `mask -p` does.
    words = ui.ok("/api/mask", {"id": "4", "words": "red square"})
    assert np.array_equal(png_array(base64.b64decode(words["png"])) > 0,
                          cli_masks(photo, tmp_path / "d", tiny_segmentation, "-p", "red square")[0] > 0)
    status, data = ui.json("/api/mask", {"id": "5", "words": "red square. blue square"})  # one object, as -p
    assert status == 400 and "one object per --prompt" in data["error"], data
    status, data = ui.json("/api/mask", {"id": "6", "words": "red " * 70 + "square"})  # past what the detector reads
    assert status == 400 and data["error"].startswith("the words 'red red") and "-p" not in data["error"], data
    # Saving elsewhere: into --out-dir-like folders under the allowed roots (here a subfolder of the photo's).
    run = ui.ok("/api/save", {"objects": [{"id": "3", "name": "only"}], "out_dir": "masks"})
    assert run["masks"][0]["path"] == str(photo.parent.resolve() / "masks" / "photo.mask1.png")


def test_bad_input_gets_the_command_lines_one_line(ui, scene_files):
    status, data = ui.json("/api/mask", {"id": "1", "points": [[20, 20]]})
    assert status == 400 and data == {"error": "open a photo first"}
    open_photo(ui, scene_files["image"])
    cases = [
        ("/api/mask", {"points": [[500, 20]]}, "point 500,20 is outside the image (96x80; X in 0..95, Y in 0..79)"),
        ("/api/mask", {"box": [30, 2, 1, 40]}, "must be X0,Y0,X1,Y1 with X0 < X1"),
        ("/api/mask", {"points": [[20, 20]], "labels": [0]}, "nothing to segment"),
        ("/api/save", {"objects": [{"id": "nope"}]}, "has no mask yet"),
        ("/api/learn", {"masks": ["red.png"], "settings": {"steps1": "-1"}}, "--steps1 must be at least 0"),
        ("/api/learn", {"masks": ["red.png"], "settings": {"steps1": "many"}}, "--steps1 'many' is not a valid integer"),
        ("/api/learn", {"masks": ["red.png"], "settings": {"warp": 1}}, "unknown setting 'warp'"),
        ("/api/generate", {"scene": "nothing-here", "prompt": "<asset1>"}, "nothing-here"),
        ("/api/cancel", {}, "nothing is running"),
    ]
    for path, body, message in cases:
        status, data = ui.json(path, body)
        assert status == 400 and "\n" not in data["error"], (path, data)
        if message:
            assert message in data["error"], (path, data)
    assert ui.ok("/api/state")["job"]["kind"] == "photo"  # none of them started a job
    status, body, _ = ui.call("/api/open", raw=b"not json")
    assert status == 400 and b"not JSON" in body
    status, data = ui.json("/api/upload?name=x.png", raw=b"not a picture")
    assert status == 400 and "cannot be read as an image" in data["error"]
    status, data = ui.json("/api/upload?name=x.exe", raw=b"MZ")
    assert status == 400 and "not a PNG, JPEG or WebP" in data["error"]


def test_learn_streams_its_progress_is_cancellable_and_resumes_then_generate(ui, scene_files):
    photo = scene_files["image"]
    open_photo(ui, photo)
    ui.ok("/api/mask", {"id": "1", "points": [[20, 20]]})
    ui.ok("/api/mask", {"id": "2", "box": [52, 42, 84, 74]})
    masks = [m["path"] for m in ui.ok("/api/save", {"objects": [{"id": "1"}, {"id": "2"}]})["masks"]]
    settings = {"steps1": "20", "steps2": "2", "prior": False, "names": "red blue"}
    # Cancelled at once, while the models load: nothing is learned or saved.
    job = ui.ok("/api/learn", {"masks": masks, "settings": settings, "name": "photo"})
    assert job["kind"] == "learn" and job["cancellable"]
    ui.ok("/api/cancel", {})
    records = ui.wait()
    assert records[-1]["state"] == "cancelled" and "nothing was learned" in records[-1]["error"], records[-1]
    # Cancelled once it learns: it stops after a step with a checkpoint, as on Ctrl-C.
    ui.ok("/api/learn", {"masks": masks, "settings": settings, "name": "photo"})
    cancelled = []

    def cancel_once_learning(record):
        if record["type"] == "progress" and record.get("task") == "phase 1" and record["completed"] and not cancelled:
            cancelled.append(ui.ok("/api/cancel", {}))

    records = ui.wait(on_record=cancel_once_learning)
    assert records[-1]["state"] == "cancelled" and "--resume" in records[-1]["error"], records[-1]
    # Resumed: it goes on from there and writes the scene; the progress is the CLI's records.
    job = ui.ok("/api/learn", {"masks": masks, "settings": settings, "name": "photo", "resume": True})
    status, data = ui.json("/api/learn", {"masks": masks, "settings": settings, "name": "photo"})
    assert status == 409 and "learn is still running" in data["error"]  # one at a time, as one learn per scene
    picture = io.BytesIO()
    Image.new("RGB", (8, 8)).save(picture, format="PNG")
    status, data = ui.json("/api/upload?name=during.png", raw=picture.getvalue())
    assert status == 409 and not (photo.parent / "during.png").exists()  # refused before it was written
    records = ui.wait()
    state = records[-1]
    assert state["state"] == "done" and state["result"]["resumed"] and state["result"]["handles"] == ["<red>", "<blue>"]
    progress = [(r["task"], r["completed"], r["total"]) for r in records if r["type"] == "progress"]
    assert ("phase 2", 2, 2) in progress and all(isinstance(r.get("info", {}).get("loss", 0.0), float)
                                                  for r in records if r["type"] == "progress")
    assert [s["name"] for s in ui.ok("/api/scenes")["scenes"]] == ["photo"]

    result = ui.finish("/api/generate", {"scene": "photo", "prompt": "a photo of <red>",
                                         "settings": {"steps": "2", "seed": "3"}})
    image = result["images"][0]
    assert image["seed"] == 3 and os.path.dirname(image["path"]) == str(photo.parent.resolve())
    status, data, headers = ui.call(f"/api/file?path={image['path']}")
    assert status == 200 and headers["Content-Type"] == "image/png" and Image.open(io.BytesIO(data)).size[0] > 0


def test_malformed_requests_get_one_line_not_a_failure(ui, scene_files, monkeypatch):
    open_photo(ui, scene_files["image"])
    for path, body in [("/api/mask", {"points": [[1, 2, 3]]}), ("/api/mask", {"points": "20,20"}),
                       ("/api/mask", {"points": [[20, True]]}), ("/api/mask", {"points": [[20, 20]], "labels": ["x"]}),
                       ("/api/mask", {"box": 5}), ("/api/mask", {"words": ["a"]}), ("/api/save", {"objects": ["a"]}),
                       ("/api/save", {"objects": {"id": 1}}), ("/api/learn", {"masks": "red.png"}),
                       ("/api/learn", {"masks": [1]}), ("/api/learn", {"masks": ["red.png"], "settings": [1]}),
                       ("/api/learn", {"masks": ["red.png"], "name": 7}), ("/api/generate", {"scene": 1, "prompt": "x"}),
                       ("/api/open", {"path": "bad\u0000name.png"}), ("/api/nothing", {}),
                       # were 500s naming a Python exception (TypeError, OverflowError)
                       ("/api/learn", {"masks": ["red.png"], "settings": {"names": 5}}),
                       ("/api/learn", {"masks": ["red.png"], "settings": {"lr1": 10**400}}),
                       ("/api/mask", {"points": [[10**400, 1]]})]:
        status, data = ui.json(path, body)
        assert status in (400, 404) and "\n" not in data["error"] and "Error" not in data["error"], (path, body, data)
    status, body, _ = ui.call("/api/open", raw=b"[" * 200_000)  # nested past Python's stack: was RecursionError, a 500
    assert status == 400 and b"not JSON" in body
    # A scene given by name is a cached scene's, never a file of that name in the server's current folder.
    monkeypatch.chdir(scene_files["image"].parent)
    (scene_files["image"].parent / "notes").write_bytes(b"not a scene")
    status, data = ui.json("/api/generate", {"scene": "notes", "prompt": "x"})
    assert status == 400 and "scene not found" in data["error"], data


def test_idle_and_refused_connections_are_closed(ui, monkeypatch):
    """A connection that sends nothing held its thread for ever; a refused POST left its
    body to be read as the next request; a Content-Length of "²" was a 500."""
    import socket

    import scenebreak.ui.server as server

    monkeypatch.setattr(server.Handler, "timeout", 1)
    host, port = ui.server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as idle:
        assert idle.recv(100) == b""  # closed by the server after its timeout
    for headers in ({"X-Scenebreak-Token": "wrong", "Content-Length": "13"},
                    {"X-Scenebreak-Token": ui.server.token, "Content-Length": "\u00b2"}):
        with socket.create_connection((host, port), timeout=30) as refused:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            refused.sendall(f"POST /api/open HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode("latin-1") + b'{"path": "x"}')
            answer = b""
            while chunk := refused.recv(65536):
                answer += chunk
        assert answer.count(b"HTTP/1.") == 1 and answer.split()[1] in (b"403", b"411"), answer[:200]


def test_a_flood_of_slow_or_idle_connections_is_bounded(ui, monkeypatch):
    """Without a token: a head sent a byte at a time, each within the timeout, held a
    thread for ever; every connection took a thread and a file handle until accept()
    failed and the server spun on it; a client gone before its refusal printed two
    tracebacks to the user's terminal."""
    import socket
    import struct
    import threading
    import time

    import scenebreak.ui.server as server

    monkeypatch.setattr(server.Handler, "timeout", 2)
    host, port = ui.server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\n")
        started, answer = time.monotonic(), b""
        for byte in b"X-Header: 1234567890":  # one byte a second: each read within the 2 s timeout
            try:
                slow.sendall(bytes([byte]))
            except OSError:  # (closed by the server)
                break
            time.sleep(1)
        with contextlib.suppress(OSError):
            answer = slow.recv(100)
        assert time.monotonic() - started < 8 and answer == b"", answer  # cut at the head's deadline, not fed for ever
    monkeypatch.setattr(server.Handler, "timeout", 60)
    ui.server.connections = threading.BoundedSemaphore(3)
    threads = threading.active_count()
    held = [socket.create_connection((host, port), timeout=30) for _ in range(3)]
    try:
        time.sleep(0.3)
        with socket.create_connection((host, port), timeout=30) as over:
            assert over.recv(100) == b""  # at the cap: closed at once, no thread for it
        assert threading.active_count() <= threads + 6  # (each: its thread and its head's timer)
    finally:
        for connection in held:
            connection.close()

    def answered() -> bool:
        try:
            return ui.call("/api/state")[0] == 200
        except OSError:  # (still at the cap: closed at once, as it should be)
            return False

    deadline = time.monotonic() + 10
    while not answered() and time.monotonic() < deadline:  # (the slots are free again once their threads end)
        time.sleep(0.1)
    assert answered()
    # Gone before the refusal: an abortive close makes the server's answer fail at once.
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        for _ in range(3):
            gone = socket.create_connection((host, port), timeout=30)
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            gone.sendall(b"GET / HTTP/1.1\r\n\r\n")
            gone.close()
        time.sleep(0.5)
    assert stderr.getvalue() == "", stderr.getvalue()
    assert ui.call("/api/state")[0] == 200


def test_http_servers_own_refusals_are_json_with_the_pages_headers(ui):
    """A method with no route (PUT, OPTIONS) or a line too long got http.server's HTML
    page, without the headers every other answer has (no-store, nosniff, the CSP)."""
    import socket

    from scenebreak.ui.server import SECURITY_HEADERS

    host, port = ui.server.server_address[:2]
    for request in (f"PUT / HTTP/1.1\r\nHost: {host}\r\n\r\n", f"OPTIONS / HTTP/1.1\r\nHost: {host}\r\n\r\n",
                    "GET /" + "a" * 70_000 + " HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, port), timeout=30) as connection:
            connection.sendall(request.encode())
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1] in (b"501", b"414"), head
        assert json.loads(body)["error"] and b"application/json" in head, answer[:300]
        for key, value in SECURITY_HEADERS.items():
            assert f"{key}: {value}".encode() in head, (key, head)


def test_hosts_of_this_machine_only_are_not_warned_about_and_an_empty_one_is_refused(serve, scene_files, tiny_model):
    from scenebreak.errors import UsageError
    from scenebreak.ui.app import App
    from scenebreak.ui.server import is_loopback, serve as serve_page

    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("localhost.")
    with pytest.raises(UsageError, match="--host is empty"):
        serve_page(scene_files["image"], host=" ")
    # On 127.0.0.2 the Host check holds too (it was left off there).
    try:
        client = serve(App(scene_files["image"], base_model=str(tiny_model), device="cpu"), host="127.0.0.2")
    except OSError:  # (macOS has only 127.0.0.1 of 127/8 unless aliased)
        pytest.skip("127.0.0.2 is no address of this machine")
    port = client.server.server_address[1]
    assert client.call("/api/state", headers={"Host": f"127.0.0.2:{port}"})[0] == 200
    assert client.call("/api/state", headers={"Host": f"evil.example:{port}"})[0] == 403


def test_the_masks_held_are_bounded(ui, scene_files, monkeypatch):
    import scenebreak.ui.app as app

    monkeypatch.setattr(app, "MAX_OBJECT_MASKS", 3)
    open_photo(ui, scene_files["image"])
    for n in range(5):
        ui.ok("/api/mask", {"id": str(n), "points": [[20, 20]]})
    ui.ok("/api/mask", {"id": "2", "points": [[20, 20]]})  # drawn again: the newest
    assert list(ui.server.app.masks) == ["3", "4", "2"]


def test_uploads_are_bounded_and_land_in_the_photos_folder(ui, scene_files):
    import http.client

    folder = scene_files["image"].parent
    picture = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(picture, format="PNG")
    ui.ok("/api/upload?name=../../up%20load.png", raw=picture.getvalue())
    assert ui.wait()[-1]["state"] == "done"
    state = ui.ok("/api/state")
    assert state["photo"] == str(folder.resolve() / "up-load.png") and state["size"] == [40, 30]  # its name, in the folder
    other = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 10, 200)).save(other, format="PNG")
    ui.ok("/api/upload?name=up%20load.png", raw=other.getvalue())
    assert ui.wait()[-1]["result"]["photo"] == str(folder.resolve() / "up-load-2.png")  # never over another file
    assert (folder / "up-load.png").read_bytes() == picture.getvalue()
    # A body over the limit is refused from its Content-Length, before it is read.
    host, port = ui.server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.putrequest("POST", "/api/upload?name=big.png")
    connection.putheader("X-Scenebreak-Token", ui.server.token)
    connection.putheader("Content-Length", str(65 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and b"over 64 MB" in response.read()
    connection.close()
    assert not (folder / "big.png").exists()


def test_the_page_is_sent_the_photo_as_scenebreak_reads_it(ui, scene_files):
    """A WebP turned by its EXIF orientation (which browsers ignore in WebP, though not in
    JPEG or PNG) was shown sideways, so clicks landed on other pixels or outside; a TIFF
    photo opened and embedded, then could not be shown. Both are sent as a PNG made
    upright; a JPEG as it is. An upload must be the kind its name says."""
    folder = scene_files["image"].parent
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright it is 30 wide, 40 high
    for name, options in (("turned.webp", {"exif": exif}), ("scan.tif", {}), ("turned.jpg", {"exif": exif})):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / name, **options)
        open_photo(ui, folder / name)
        assert ui.ok("/api/state")["size"] == ([40, 30] if name == "scan.tif" else [30, 40])
        status, body, headers = ui.call(f"/api/file?path={name}")
        assert status == 200, body
        sent = Image.open(io.BytesIO(body))
        if name == "turned.jpg":
            assert body == (folder / name).read_bytes()  # the browser turns a JPEG itself
        else:
            assert headers["Content-Type"] == "image/png" and sent.size == tuple(ui.ok("/api/state")["size"])
    tiff = io.BytesIO()
    Image.new("RGB", (40, 30)).save(tiff, format="TIFF")
    status, data = ui.json("/api/upload?name=scan.png", raw=tiff.getvalue())
    assert status == 400 and "image/tiff, not the PNG its name says" in data["error"]
    assert not (folder / "scan.png").exists()


def test_a_hand_drawn_mask_in_the_way_is_said_in_the_pages_words(ui, scene_files):
    """Save refuses to replace a mask you drew, as `mask` does, but its advice was the
    command line's ("--out-dir", "pass --force"), which the page has no control for."""
    photo = scene_files["image"]
    open_photo(ui, photo)
    ui.ok("/api/mask", {"id": "1", "points": [[20, 20]]})
    drawn = photo.with_name(f"{photo.stem}.mask1.png")
    Image.new("L", Image.open(photo).size, 255).save(drawn)
    status, data = ui.json("/api/save", {"objects": [{"id": "1"}]})
    assert status == 400 and "is not a mask scenebreak wrote" in data["error"], data
    assert '"Save to folder"' in data["error"] and "--force" not in data["error"] and "--out-dir" not in data["error"]
    assert Image.open(drawn).getextrema() == (255, 255)  # kept


def test_a_stream_follows_its_own_job_even_after_another_started(ui, scene_files):
    """The browser reconnects a dropped event stream by itself (the same URL, with the
    last record's id): if its job ended meanwhile and another page started another, the
    stream followed that one, and the page took its records and end for its own."""
    photo = scene_files["image"]
    other = photo.with_name("other.png")
    Image.open(photo).save(other)
    first = ui.ok("/api/open", {"path": str(photo)})
    assert ui.wait()[-1]["result"]["photo"] == str(photo.resolve())
    second = ui.ok("/api/open", {"path": str(other)})
    assert second["id"] != first["id"] and ui.wait()[-1]["state"] == "done"
    records = ui.wait(job=first["id"])
    assert records[-1]["result"]["photo"] == str(photo.resolve())  # the first job's end, not the second's
    assert ui.wait(job=first["id"], after=records[-1]["seq"]) == []  # reconnected after its end: nothing more
    for unknown in (12345, "%C2%B2"):  # (a digit Python reads as one, int() does not)
        gone = ui.wait(job=unknown)
        assert [r["state"] for r in gone] == ["unknown"] and "reload the page" in gone[0]["error"]


def test_a_page_acting_on_a_photo_another_tab_replaced_is_told_to_reload(ui, scene_files):
    """Two tabs on one server: tab A's clicks, save and learn named no photo, so after tab
    B opened another they segmented, saved and learned B's photo (with A's masks: of the
    same size, nothing else failed)."""
    import shutil

    first = scene_files["image"]
    second = first.parent / "other.png"
    shutil.copy(first, second)
    open_photo(ui, first)
    page_a = ui.ok("/api/state")["photo"]
    open_photo(ui, second)  # tab B
    for path, body in (("/api/mask", {"id": "1", "points": [[20, 20]]}),
                       ("/api/save", {"objects": [{"id": "1", "name": "red"}]}),
                       ("/api/learn", {"masks": [str(scene_files["masks"][0])]})):
        status, data = ui.json(path, {**body, "photo": page_a})
        assert status == 409 and "another photo (other.png) was opened since" in data["error"], (path, status, data)
    assert ui.server.app.job.kind == "photo"  # nothing started
    page_b = ui.ok("/api/state")["photo"]
    assert ui.ok("/api/mask", {"id": "1", "points": [[20, 20]], "photo": page_b})["area"] > 0


def test_photo_after_photo_loads_segment_anything_and_the_detector_once(ui, scene_files, monkeypatch):
    """Each photo opened on the page loaded SAM again (seconds on a GPU, more on a CPU),
    with the last photo's SAM still held while it did; the last session now hands its
    models to the next, which then gives the masks a fresh load gives. A session closed
    meanwhile answers no click: the tab that sent it is told to reload."""
    import shutil

    from scenebreak import kept
    from scenebreak.masks import detector, segmenter
    from scenebreak.masks.session import SessionClosed

    from helpers import count_loads

    loads = count_loads(monkeypatch, segmenter.Segmenter, detector.Detector)
    first = scene_files["image"]
    second = first.parent / "other.png"
    shutil.copy(first, second)
    asks = [{"id": "1", "points": [[20, 20]]}, {"id": "2", "words": "red square"}]
    masks = []
    for photo in (first, second, first):
        open_photo(ui, photo)
        masks.append([ui.ok("/api/mask", ask)["png"] for ask in asks])
    assert loads == ["Segmenter", "Detector"]
    old = ui.server.app.session
    ui.server.app.session.close()  # as if another tab had opened a photo meanwhile
    with pytest.raises(SessionClosed):
        old.mask("x", [(20, 20)])
    ui.server.app.session = old  # (the closed one still the open one, mid-way through a photo's opening)
    status, data = ui.json("/api/mask", asks[0])
    assert status == 409 and "another photo was opened meanwhile" in data["error"], data
    kept.unload()
    open_photo(ui, first)
    masks.append([ui.ok("/api/mask", ask)["png"] for ask in asks])
    assert loads == ["Segmenter", "Detector", "Segmenter", "Detector"]
    assert all(m == masks[0] for m in masks), "the kept models gave other masks than a fresh load"


def test_words_during_a_learn_on_a_gpu_wait_rather_than_load_the_detector_there(ui, scene_files):
    """The detector would load onto the GPU a running learn planned its memory on."""
    from scenebreak.device import Device

    photo = scene_files["image"]
    open_photo(ui, photo)
    ui.ok("/api/mask", {"id": "1", "points": [[20, 20]]})
    masks = [m["path"] for m in ui.ok("/api/save", {"objects": [{"id": "1"}]})["masks"]]
    session = ui.server.app.session
    ui.ok("/api/learn", {"masks": masks, "settings": {"steps1": "5000", "prior": False}, "name": "busy"})
    session.device = Device(type="cuda", name="cuda:0")  # as if the page's models were on a GPU
    try:
        status, data = ui.json("/api/mask", {"id": "2", "words": "red square"})
        assert status == 409 and "loads a detector onto cuda:0, which learn is using" in data["error"], data
        assert session.detector is None
        assert ui.ok("/api/mask", {"id": "2", "points": [[60, 50]]})["area"] > 0  # clicks still work
    finally:
        session.device = Device(type="cpu", name="cpu")
        ui.ok("/api/cancel", {})
        ui.wait()


def test_a_page_over_the_home_folder_or_the_root_is_warned_about(tmp_path, monkeypatch):
    """Started with no photo, the page's folder is the current one and everything below."""
    from scenebreak.ui.app import App

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "photos").mkdir()
    for folder, warned in ((tmp_path, True), (tmp_path / "photos", False), (Path("/"), True)):
        monkeypatch.chdir(folder)
        heard = []
        App(report=heard.append)
        assert any("anywhere under" in getattr(m, "text", "") for m in heard) == warned, folder


def test_a_cancelled_generate_gives_the_images_it_wrote(ui, learned):
    """They were written, but the page showed only "stopped: N image(s) written to DIR"."""
    import shutil

    from scenebreak.paths import scene_path

    scene_path("pic").parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(learned.path, scene_path("pic"))
    ui.ok("/api/generate", {"scene": "pic", "prompt": "a photo of <asset1>",
                            "settings": {"steps": "2", "num_images": "50", "batch_size": "1", "seed": "3"}})
    ui.ok("/api/cancel", {})
    state = ui.wait()[-1]
    assert state["state"] == "cancelled" and "image(s) written" in state["error"], state
    images = state["result"]["images"]
    assert 1 <= len(images) < 50 and all(os.path.exists(i["path"]) for i in images)
    assert [i["seed"] for i in images] == list(range(3, 3 + len(images)))


def test_folders_the_page_cannot_write_to_are_said_in_its_words(ui, scene_files, tmp_path):
    """An --out-dir under a file was taken at start, and only the first Save (after the
    clicks) and Generate failed; a "Save to folder" the page cannot write to was answered
    with "choose another folder with --out-dir", a control the page does not have."""
    from scenebreak.errors import InvalidInput
    from scenebreak.ui.app import App

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InvalidInput, match="--out-dir .*a-file/sub is not a folder you can write to"):
        App(scene_files["image"], out_dir=tmp_path / "a-file" / "sub")
    photo = scene_files["image"]
    open_photo(ui, photo)
    ui.ok("/api/mask", {"id": "1", "points": [[20, 20]]})
    (photo.parent / "not-a-folder").write_text("x")
    status, data = ui.json("/api/save", {"objects": [{"id": "1"}], "out_dir": str(photo.parent / "not-a-folder")})
    assert status == 400 and data["error"].endswith('choose another folder ("Save to folder")'), data


def test_the_folders_list_leaves_out_the_images_scenebreak_made(ui, learned, scene_files, tmp_path):
    """Generated images (in the photo's folder by default) were listed as photos to open."""
    import shutil

    from scenebreak import GenerateConfig, generate

    made = generate(learned.path, "<asset1>", GenerateConfig(steps=1, seed=0), out_dir=scene_files["image"].parent)
    shutil.copy(scene_files["image"], scene_files["image"].with_name("holiday.png"))
    listed = ui.ok("/api/photos")["photos"]
    assert made.images[0].path.name not in listed and "holiday.png" in listed and scene_files["image"].name in listed


def test_listing_the_folder_never_opens_a_fifo(tmp_path):
    """Telling scenebreak's images from photos reads their start: a FIFO named like a
    PNG would have blocked the listing (and the page) for good."""
    import threading

    from scenebreak.ui.app import made_by_scenebreak

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    answers = []
    reader = threading.Thread(target=lambda: answers.append(made_by_scenebreak(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # (a blocked open: let it go, then fail)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert answers == [False]
