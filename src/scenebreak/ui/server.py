"""The page's HTTP server: the standard library's ThreadingHTTPServer, on 127.0.0.1
unless another host is asked for. No web framework: a dozen JSON routes, the static
page and one event stream need nothing more, and the standard library adds no
dependency to keep up to date. Every request must carry the token (header
`X-Scenebreak-Token`, or `?token=` where a browser cannot set headers: the first page
load, images, the event stream); bodies are bounded; every failure is one JSON line
`{"error": ...}`, the command line's message."""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .. import paths
from ..errors import InvalidInput, SceneBreakError, UsageError, sigterm_stops
from ..events import Message
from .app import MAX_UPLOAD_BYTES, App, Busy, OutsideFolders
from .jobs import one_line

MAX_JSON_BYTES = 1 << 20
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
KEEPALIVE = 15.0  # seconds between comments on an idle event stream
# Connections served at once: a page needs a few (its event stream, an action, images);
# past this a new one is closed at once, so a flood of idle connections cannot take
# a thread and a file handle each until accept() fails.
MAX_CONNECTIONS = 64
# The page loads only from this server; nothing from the network, no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _text_or_none(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidInput("the photo must be text")
    return value


class Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def status_of(exc: BaseException) -> HTTPStatus:
    if isinstance(exc, OutsideFolders):
        return HTTPStatus.FORBIDDEN
    if isinstance(exc, Busy):
        return HTTPStatus.CONFLICT
    if isinstance(exc, UsageError):
        return HTTPStatus.BAD_REQUEST
    return HTTPStatus.INTERNAL_SERVER_ERROR


class Server(ThreadingHTTPServer):
    daemon_threads = True  # an open event stream never keeps the process alive

    @property
    def allow_reuse_address(self) -> bool:
        # On Windows SO_REUSEADDR lets a second server bind a port already listened on
        # (no "port in use": the page would reach the other one); elsewhere it only lets
        # a restart bind past the last run's closing connections.
        return not paths.ON_WINDOWS

    def __init__(self, app: App, host: str, port: int):
        self.app, self.token, self.closing = app, secrets.token_urlsafe(24), threading.Event()
        self.streams, self.streams_lock = 0, threading.Lock()  # event streams open now
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        self.host = host

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/?token={self.token}"

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            # Out of file handles, accept() fails at once while the socket stays ready:
            # socketserver would retry in a busy loop. Wait a little instead.
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.1)
            raise

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            self.shutdown_request(request)  # at the cap: closed at once, no thread started
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client that went away: nothing to say
        # Anything else is a fault of ours: one line, not socketserver's traceback.
        self.app.echo(Message(f"the page's server: {one_line(exc)[0]}", "warning"))

    def let_streams_finish(self, timeout: float) -> None:
        """Wait (up to `timeout` s) for the open event streams to send what they still
        have (the stopped job's final record) and end."""
        deadline = time.monotonic() + timeout
        while self.streams and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop serving and close every stream; what runs is the app's to stop."""
        self.closing.set()
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    # A connection that sends nothing (or a body a byte a minute) holds a thread: not for ever.
    # (The event stream writes at least every 15 s, so it never waits this long.) A
    # request's head must arrive whole within this time of the wait for it starting.
    timeout = 60

    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # stderr carries scenebreak's own progress, not a request log

    def handle_one_request(self):
        # The socket's timeout bounds each read, so a head sent a byte every 50 s held its
        # thread for ever: the whole head (first line and headers) must come within the
        # timeout of the wait for it starting, or the connection is cut.
        self.head_timer = threading.Timer(self.timeout, self._cut)
        self.head_timer.daemon = True
        self.head_timer.start()
        try:
            super().handle_one_request()
        finally:
            self.head_timer.cancel()

    def _cut(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
        except OSError:
            pass

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (a method with no do_ here, a line too long, too
        # many headers): the same JSON line and headers as every other answer.
        self.head_timer.cancel()
        self.close_connection = True
        status = HTTPStatus(code)
        self._error(status, message or status.phrase)

    # -- plumbing ------------------------------------------------------------------------------------

    def _send(self, status: HTTPStatus, body: bytes, kind: str, extra: dict | None = None) -> None:
        self.send_response(status)
        closing = {"Connection": "close"} if self.close_connection else {}  # (said, not only done)
        for key, value in {**SECURITY_HEADERS, "Content-Type": kind, "Content-Length": str(len(body)), **closing,
                           **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(data, default=str).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        try:
            self._json({"error": message}, status)
        except OSError:  # the client left before its answer (often a refused one): nothing to tell
            self.close_connection = True

    def _check(self, query: dict) -> None:
        """The token, and (on a local address) a local Host header: a web page elsewhere
        cannot reach this server through a name that points at 127.0.0.1."""
        # In the URL only for what a browser loads itself (the page, its files, the event
        # stream, images); an action sends it in its header, so a URL seen in the history
        # cannot change anything.
        in_url = (query.get("token") or [""])[0] if self.command in ("GET", "HEAD") else ""
        given = self.headers.get("X-Scenebreak-Token") or in_url
        if not hmac.compare_digest(given.encode(), self.server.token.encode()):
            raise Refused(HTTPStatus.FORBIDDEN, "this request has no valid token: open the URL that scenebreak ui printed")
        if is_loopback(self.server.host):
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if not is_loopback(host):
                raise Refused(HTTPStatus.FORBIDDEN, f"requests for host {host!r} are refused: use {self.server.url.split('?')[0]}")

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):  # ("²" is a digit to isdigit, not to int)
            self.close_connection = True
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length")
        if int(length) > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request is over {limit >> 20} MB")
        return self.rfile.read(int(length))

    def _payload(self) -> dict:
        try:
            data = json.loads(self._body(MAX_JSON_BYTES) or b"{}")
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than Python's stack)
            raise Refused(HTTPStatus.BAD_REQUEST, "the request is not JSON") from None
        if not isinstance(data, dict):
            raise Refused(HTTPStatus.BAD_REQUEST, "the request must be a JSON object")
        return data

    def _handle(self, route) -> None:
        self.head_timer.cancel()  # the head is in; what follows has the socket's timeout per read
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        try:
            try:
                self._check(query)
            except Refused:
                # A refused request's body is never read, so the connection cannot carry
                # another; nor may a GET's carry hundreds of guesses at the token.
                self.close_connection = True
                raise
            route(parts.path, query)
        except Refused as exc:
            self._error(exc.status, str(exc))
        except SceneBreakError as exc:
            self._error(status_of(exc), str(exc))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - one line, as the command line gives it
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, one_line(exc)[0])

    def do_GET(self):  # noqa: N802 - http.server's name
        self._handle(self._get)

    def do_POST(self):  # noqa: N802
        self._handle(self._post)

    # -- routes ---------------------------------------------------------------------------------------

    def _get(self, path: str, query: dict) -> None:
        app = self.server.app
        arg = (query.get("path") or [""])[0]
        if path == "/":
            page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
            self._send(HTTPStatus.OK, page.replace("__TOKEN__", self.server.token).encode(), "text/html; charset=utf-8")
        elif path.startswith("/static/") and path[len("/static/"):] in STATIC:
            name = path[len("/static/"):]
            data = resources.files(__package__).joinpath("static", name).read_bytes()
            self._send(HTTPStatus.OK, data, STATIC[name] + "; charset=utf-8")
        elif path == "/api/state":
            self._json(app.state())
        elif path == "/api/photos":
            self._json({"folder": str(app.folder), "photos": app.photos()})
        elif path == "/api/scenes":
            self._json({"scenes": app.scenes()})
        elif path == "/api/file":
            data, kind = app.read_image_file(arg)
            self._send(HTTPStatus.OK, data, kind)
        elif path == "/api/events":
            self._events(query)
        else:
            raise Refused(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def _post(self, path: str, query: dict) -> None:
        app = self.server.app
        if path == "/api/upload":
            data = self._body(MAX_UPLOAD_BYTES)
            self._json(app.upload((query.get("name") or ["photo.png"])[0], data))
            return
        body = self._payload()
        if path == "/api/open":
            self._json(app.open_photo(body.get("path")))
        elif path == "/api/mask":
            self._json(app.mask(body.get("id", "1"), body.get("points"), body.get("labels"), body.get("box"),
                                body.get("words"), photo=_text_or_none(body.get("photo"))))
        elif path == "/api/save":
            self._json(app.save(body.get("objects"), body.get("out_dir"), photo=_text_or_none(body.get("photo"))))
        elif path == "/api/learn":
            self._json(app.learn(body.get("masks"), body.get("settings"), body.get("name"), body.get("base_model"),
                                 body.get("resume") is True, body.get("force") is True,
                                 photo=_text_or_none(body.get("photo"))))
        elif path == "/api/generate":
            self._json(app.generate(body.get("scene"), body.get("prompt"), body.get("settings")))
        elif path == "/api/cancel":
            self._json(app.cancel())
        else:
            raise Refused(HTTPStatus.NOT_FOUND, f"no such action: {path}")

    def _events(self, query: dict) -> None:
        """Server-Sent Events: the records of the job `job` (default: the current one)
        after `after` (or the browser's Last-Event-ID), until the job ends. A stream that
        reconnects after its job was followed by another still gets its own job's end."""
        wanted = (query.get("job") or [None])[0]
        job = self.server.app.job_by_id(wanted)
        try:
            after = int(self.headers.get("Last-Event-ID") or (query.get("after") or ["0"])[0])
        except ValueError:
            after = 0
        self.send_response(HTTPStatus.OK)
        for key, value in {**SECURITY_HEADERS, "Content-Type": "text/event-stream"}.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if job is None and wanted is not None:  # a job of another server (restarted), or long gone
            gone = {"seq": 1, "job": "action", "type": "state", "state": "unknown", "result": None,
                    "error": "this server no longer knows that action (was it restarted?): reload the page"}
            self.wfile.write(f"id: 1\ndata: {json.dumps(gone)}\n\n".encode())
            return
        if job is None:
            self.wfile.write(b"retry: 3000\n\n")
            return
        with self.server.streams_lock:
            self.server.streams += 1
        try:
            while not self.server.closing.is_set():
                records = job.records_after(after, KEEPALIVE)
                for record in records:
                    self.wfile.write(f"id: {record['seq']}\ndata: {json.dumps(record)}\n\n".encode())
                    after = record["seq"]
                if not records:
                    self.wfile.write(b": still here\n\n")
                self.wfile.flush()
                if not job.running and after >= job.seq:
                    return
        finally:
            with self.server.streams_lock:
                self.server.streams -= 1


def open_in_browser(url: str) -> None:
    """Open the page in the user's browser without putting its token on a command line
    (the browser's arguments are visible to every user of the machine in `ps`): the
    browser is given a file only its owner can read, which sends it on to `url` (as
    Jupyter does). The file goes when this process ends."""
    import atexit
    import html
    import shutil
    import tempfile
    import webbrowser

    folder = Path(tempfile.mkdtemp(prefix="scenebreak-ui-"))  # mode 0700
    page = folder / "open.html"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={html.escape(url)}">'
                   f'<title>scenebreak</title><a href="{html.escape(url)}">open scenebreak</a>\n')
    atexit.register(shutil.rmtree, folder, True)
    if not graphical_session():
        return  # (a text browser would take over this terminal: the URL printed is the way in)
    try:
        browser = webbrowser.get()
    except webbrowser.Error:
        return
    if isinstance(browser, webbrowser.GenericBrowser) and not isinstance(browser, webbrowser.BackgroundBrowser):
        return  # lynx, w3m...: run in the foreground, in this terminal, until quit
    # The browser starts with this process's stdout, which carries only the URL: its own
    # chatter ("Created new window in existing browser session") goes nowhere instead.
    kept = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            browser.open(page.as_uri())
    finally:
        os.dup2(kept, 1)
        os.close(kept)


def graphical_session() -> bool:
    """Whether a browser window can open here: macOS and Windows, or Linux and the other
    Unixes with a display (not over ssh without one)."""
    import sys

    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def listen_failure(exc: OSError, host: str, port: int) -> SceneBreakError:
    """Why the page cannot listen at host:port, in one line naming the fix."""
    if exc.errno == errno.EADDRINUSE:
        return SceneBreakError(f"port {port} on {host} is in use (another `scenebreak ui`?): choose another --port, "
                               "or leave --port out to take a free one")
    if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return UsageError(f"--host {host} is not an address of this machine ({exc.strerror or exc}): "
                          "use 127.0.0.1 (this machine only) or 0.0.0.0 (every network)")
    if exc.errno == errno.EACCES:
        return UsageError(f"port {port} needs privileges on this system: choose a --port above 1023")
    return SceneBreakError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --host or --port")


def serve(photo=None, *, host: str = "127.0.0.1", port: int = 0, on_ready=None, **options) -> None:
    """Serve the page for `photo` (App's `options`: out_dir, mask_config, base_model,
    device, report) until interrupted (Ctrl-C: KeyboardInterrupt); `on_ready(url)`
    gets the URL with its token. Whatever runs is stopped (learn saves its checkpoint)
    and the port closed before it returns."""
    if not host.strip():  # (an empty host listens on every network, quietly)
        raise UsageError("--host is empty: use 127.0.0.1 (this machine only) or 0.0.0.0 (every network)")
    app = App(photo, **options)
    if not is_loopback(host):  # (said by the library, so that Python callers hear it too)
        app.echo(Message(f"listening on {host}: whoever reaches it with the URL's token can read the photo's folder "
                         "and use this machine's GPU", "warning"))
    try:
        server = Server(app, host, port)
    except OSError as exc:  # the port is taken, or the host is no address of this machine
        app.close()
        raise listen_failure(exc, host, port) from None
    try:
        # SIGTERM (systemd, `kill`) stops the page as Ctrl-C does: a running learn saves its checkpoint.
        with sigterm_stops(app.stop_note):
            if on_ready:
                on_ready(server.url)
            server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()  # no new requests
        app.close()  # what runs stops (learn saves its checkpoint) and says so in its records...
        server.let_streams_finish(2.0)  # ...which the open pages then get, before the streams close
        server.closing.set()
