"""A `scenebreak ui` server on the synthetic photo with the tiny segmentation and SD
models, serving from a thread of the test process, and a small client for it. The
fixtures are imported by the test modules that use them: a second conftest.py would
take the module name `conftest` from tests/conftest.py."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest


class Client:
    def __init__(self, server):
        self.server = server
        self.base = server.url.split("/?")[0]

    def call(self, path, body=None, token=True, headers=None, raw: bytes | None = None):
        """(status, JSON answer) of GET `path`, or POST with `body` (JSON) or `raw` bytes."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method="POST" if data is not None else "GET")
        if token:
            request.add_header("X-Scenebreak-Token", self.server.token)
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), dict(exc.headers)

    def json(self, path, body=None, **kwargs):
        status, data, _ = self.call(path, body, **kwargs)
        return status, json.loads(data)

    def ok(self, path, body=None, **kwargs):
        status, data = self.json(path, body, **kwargs)
        assert status == 200, data
        return data

    def wait(self, timeout: float = 120, job: int | str | None = None, after: int = 0, on_record=None) -> list[dict]:
        """The records of the running job (or of the job of that id) from its event
        stream, up to its final state; `on_record(record)` is called on each as it comes."""
        url = f"{self.base}/api/events?after={after}&token={self.server.token}" + (f"&job={job}" if job else "")
        records = []
        with urllib.request.urlopen(url, timeout=timeout) as stream:
            for line in stream:
                if line.startswith(b"data: "):
                    records.append(json.loads(line[6:]))
                    if on_record is not None:
                        on_record(records[-1])
                    if records[-1]["type"] == "state":
                        break
        return records

    def finish(self, path, body, timeout: float = 120) -> dict:
        """Start a long action and wait for it: its result (it must succeed)."""
        self.ok(path, body)
        state = self.wait(timeout)[-1]
        assert state["state"] == "done", state
        return state["result"]


@pytest.fixture
def serve():
    """serve(app) -> a Client of a server for `app`, running in a thread; stopped after the test."""
    from scenebreak.ui.server import Server

    started = []

    def start(app, host="127.0.0.1"):
        server = Server(app, host, 0)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread, app))
        return Client(server)

    yield start
    for server, thread, app in started:
        server.stop()
        thread.join(10)
        app.close(60)


@pytest.fixture
def ui(serve, scene_files, tiny_segmentation, tiny_model):
    """A client of a server for the synthetic photo (not opened yet) with the tiny models."""
    from scenebreak.config import MaskConfig
    from scenebreak.ui.app import App

    detector, segmenter = tiny_segmentation
    config = MaskConfig(detector=str(detector), segmenter=str(segmenter), threshold=0.0)
    return serve(App(scene_files["image"], mask_config=config, base_model=str(tiny_model), device="cpu"))
