"""The review server: a release's boxes judged in a browser, verdicts into the review store.

Standard library only (``http.server``, one thread per request). Routes:

- ``GET /``: the review page (storage.releases.review_page), with this server's write token;
- ``GET /api/state``: the release, the sampler, and per finding its boxes and verdicts so far
  (every reviewer's: the page polls it, so reviewers see each other's progress);
- ``GET /api/next?finding=F&reviewer=R``: the next box of F's queue for R (review_queue);
- ``GET /image/<box_id>``: the box's image as PNG, its longer side at most ``IMAGE_SIDE`` px;
- ``GET /release/<path>``: a file of the release (its report), nothing outside it: ``..``, an
  absolute path or a symbolic link anywhere on the way is refused (403);
- ``POST /api/verdict`` ({box_id, verdict, reviewer, box?}) and ``POST /api/undo`` ({reviewer}):
  only with the page's token in ``X-Review-Token`` and, where the browser sends one, an
  ``Origin`` that is this server; else 403 and nothing is written.

Every request must name this server in its ``Host`` header: one of the names it was started for
(``allowed_hosts``: 127.0.0.1, localhost, [::1], ``--host`` and ``--allow-host``, each with the
port), else 421 before anything is read or served. A page on another site that a DNS-rebinding
attack points at this address sends its own name there, and gets neither the page (with its write
token) nor a write.

Errors come back as JSON ``{"error": message}`` in one line: 400 for a bad verdict, body or unknown
box, 403, 404, 411, 413, 421; a request the server cannot serve at all (a bug) gets 500 with the
error's one line, and the console one line too: no request prints a traceback.
"""

from __future__ import annotations

import io
import json
import mimetypes
import secrets
import socket
import sys
import threading
from collections.abc import Iterable, Mapping
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow.parquet as pq
from PIL import Image

from cxr_miner.storage.inputs.images import ImageReadError, read_image
from cxr_miner.storage.releases.release import BOXES_FILE
from cxr_miner.storage.releases.review_page import review_page
from cxr_miner.storage.releases.review_queue import SAMPLER, QueueBox, next_box, review_order
from cxr_miner.storage.releases.reviews import ReviewStore, released_boxes, shown
from cxr_miner.storage.vocab.errors import InputError, UserError

IMAGE_SIDE = 1024
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT_S = 30  # a client that stops sending mid-request is let go after this long
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_ADDRESSES = ("", "0.0.0.0", "::")
BOX_COLUMNS = ("box_id", "image_id", "finding", "image_width", "image_height", "x_min", "y_min", "x_max", "y_max")


class Refused(Exception):
    """A request the server will not serve (status, message)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ReviewApp:
    """A release under review: its boxes and their queues, where the images are, the store.

    ``release``: the release folder (``latest`` is followed); ``root``: the collection's root, that
    the index's ``source_path`` of ``sources`` (image id -> path) is relative to; ``store``: the
    review store's path. One ReviewStore per serving thread (SQLite connections stay in theirs).
    """

    def __init__(self, release: Path, root: Path, sources: Mapping[str, str], store: Path, reviewer: str = "") -> None:
        self.release = Path(release).resolve()
        self.version = self.release.name
        self.root, self.sources, self.store_path, self.reviewer = Path(root), dict(sources), Path(store), reviewer
        self.token = secrets.token_urlsafe(24)
        table = pq.read_table(self.release / BOXES_FILE, columns=[*BOX_COLUMNS, "confidence", "score", "rank"])
        self.boxes = released_boxes(table)
        rows = table.to_pylist()
        self.details = {row["box_id"]: row for row in rows}
        self.queues = review_order([QueueBox(r["box_id"], r["finding"], r["confidence"], r["score"]) for r in rows])
        self._local = threading.local()
        self.image_png = lru_cache(maxsize=64)(self._image_png)

    def store(self) -> ReviewStore:
        if getattr(self._local, "store", None) is None:
            self._local.store = ReviewStore(self.store_path)
        store: ReviewStore = self._local.store
        return store

    def state(self) -> dict[str, Any]:
        progress = self.store().progress(self.version)
        findings = [
            {
                "finding": finding,
                "boxes": len(order),
                "has_confidence": any(self.details[b]["confidence"] is not None for b in order),
                "verdicts": progress.get(finding, {}),
            }
            for finding, order in self.queues.items()
        ]
        return {"release": self.version, "sampler": SAMPLER, "findings": findings}

    def next_for(self, finding: str, reviewer: str) -> dict[str, Any]:
        if finding not in self.queues:
            raise InputError("finding", f"{finding!r} has no boxes in release {self.version}")
        current = self.store().current(self.version)
        verdicts = {row["box_id"]: row["verdict"] for row in current}
        skipped = {row["box_id"] for row in current if row["verdict"] == "skip" and row["reviewer"] == reviewer}
        box_id = next_box(self.queues[finding], verdicts, skipped)
        if box_id is None:
            return {"done": True, "finding": finding}
        row = self.details[box_id]
        return {
            "done": False,
            **{
                k: row[k]
                for k in ("box_id", "image_id", "finding", "image_width", "image_height", "confidence", "rank")
            },
            "box": [row[k] for k in ("x_min", "y_min", "x_max", "y_max")],
            "image_url": f"/image/{box_id}",
        }

    def verdict(self, body: Mapping[str, Any]) -> dict[str, Any]:
        box_id, verdict = _text_field(body, "box_id"), _text_field(body, "verdict")
        reviewer = _text_field(body, "reviewer", required=False) or self.reviewer
        seq = self.store().record(self.version, self.boxes, box_id, verdict, reviewer, body.get("box"))
        return {"stored": seq}

    def undo(self, body: Mapping[str, Any]) -> dict[str, Any]:
        reviewer = _text_field(body, "reviewer", required=False) or self.reviewer
        return {"undone": self.store().undo(self.version, reviewer)}

    def _image_png(self, box_id: str) -> bytes:
        row = self.details.get(box_id)
        if row is None:
            raise Refused(HTTPStatus.NOT_FOUND, f"no box {box_id!r} in release {self.version}")
        try:
            pixels = read_image(self.root / self.sources[row["image_id"]])
        except (KeyError, ImageReadError, OSError) as error:
            raise Refused(HTTPStatus.NOT_FOUND, f"image of box {box_id}: {error}") from error
        image = Image.fromarray(pixels)
        image.thumbnail((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    def release_member(self, relative: str) -> Path:
        """The file ``relative`` (URL path, '/'-separated) of the release; Refused if it is outside
        it, behind a symbolic link, or missing."""
        parts = PurePosixPath(unquote(relative)).parts
        if not parts or parts[0] == "/" or any(p in ("..", ".") or "\\" in p or "\x00" in p for p in parts):
            raise Refused(HTTPStatus.FORBIDDEN, f"{relative!r}: not a path inside the release")
        path = self.release
        for part in parts:
            path = path / part
            if path.is_symlink():
                raise Refused(HTTPStatus.FORBIDDEN, f"{relative!r}: a symbolic link; not served")
        if not path.is_file() or not path.resolve().is_relative_to(self.release):
            raise Refused(HTTPStatus.NOT_FOUND, f"{relative!r}: no such file in release {self.version}")
        return path


class ReviewHandler(BaseHTTPRequestHandler):
    """HTTP for one ReviewApp (``app``, set on the subclass ``review_server`` makes); it answers the
    Host header values of its server (``ReviewServer.hosts``)."""

    app: ReviewApp
    server: ReviewServer
    server_version = "cxr-miner-review"
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the command prints what matters
        pass

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, route: Any) -> None:
        try:
            self._check_host()
            status, kind, payload = route(urlsplit(self.path))
        except Refused as refused:
            status, kind, payload = refused.status, "application/json", _json({"error": str(refused)})
        except UserError as error:
            status, kind, payload = HTTPStatus.BAD_REQUEST, "application/json", _json({"error": str(error)})
        except (ConnectionError, TimeoutError):
            raise  # the connection itself failed (a client gone, or stalled): nobody to answer
        except Exception as error:  # a bug: one line back and one on the console, never a traceback
            say_failure(self, error)
            status, kind = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json"
            payload = _json({"error": one_line(error)})
        if status >= HTTPStatus.BAD_REQUEST:
            self.close_connection = True  # a body may be left unread: never parse it as the next request
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(payload)

    def _check_host(self) -> None:
        """421 unless the request names this server (DNS rebinding: see the module's docstring)."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.server.hosts:
            raise Refused(
                HTTPStatus.MISDIRECTED_REQUEST,
                f"this server answers for {', '.join(sorted(self.server.hosts))}, not Host {shown(host)}",
            )

    def _get(self, url: Any) -> tuple[HTTPStatus, str, bytes]:
        app, query = self.app, parse_qs(url.query)
        if url.path in ("/", "/index.html"):
            page = review_page(app.version, app.token, app.reviewer, SAMPLER)
            return HTTPStatus.OK, "text/html; charset=utf-8", page.encode()
        if url.path == "/api/state":
            return HTTPStatus.OK, "application/json", _json(app.state())
        if url.path == "/api/next":
            finding, reviewer = (query.get(k, [""])[0] for k in ("finding", "reviewer"))
            return HTTPStatus.OK, "application/json", _json(app.next_for(finding, reviewer or app.reviewer))
        if url.path.startswith("/image/"):
            return HTTPStatus.OK, "image/png", app.image_png(url.path.removeprefix("/image/"))
        if url.path.startswith("/release/"):
            path = app.release_member(url.path.removeprefix("/release/"))
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            return HTTPStatus.OK, kind, path.read_bytes()
        raise Refused(HTTPStatus.NOT_FOUND, f"{url.path}: no such page")

    def _post(self, url: Any) -> tuple[HTTPStatus, str, bytes]:
        self._check_origin()
        body = self._json_body()
        if url.path == "/api/verdict":
            return HTTPStatus.OK, "application/json", _json(self.app.verdict(body))
        if url.path == "/api/undo":
            return HTTPStatus.OK, "application/json", _json(self.app.undo(body))
        raise Refused(HTTPStatus.NOT_FOUND, f"{url.path}: nothing to post to")

    def _check_origin(self) -> None:
        """Writes come from this server's own page: its token, and its origin where one is sent."""
        if not secrets.compare_digest(self.headers.get("X-Review-Token", ""), self.app.token):
            raise Refused(HTTPStatus.FORBIDDEN, "write refused: not from this server's review page (no valid token)")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() not in {f"http://{host}" for host in self.server.hosts}:
            raise Refused(HTTPStatus.FORBIDDEN, f"write refused: from another origin ({shown(origin)})")

    def _json_body(self) -> dict[str, Any]:
        length = content_length(self.headers.get("Content-Length"))
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
            reason = "nested too deeply" if isinstance(error, RecursionError) else one_line(error)
            raise InputError("request", f"the body is not JSON: {reason}") from None
        if not isinstance(body, dict):
            raise InputError("request", "the body must be a JSON object")
        return body


def content_length(header: str | None) -> int:
    """A request body's length from its Content-Length header: 411 without one, 400 unless it is a
    whole number of bytes, 413 beyond MAX_BODY."""
    if header is None:
        raise Refused(HTTPStatus.LENGTH_REQUIRED, "a JSON body with its Content-Length is needed")
    text = header.strip()
    if not text.isascii() or not text.isdigit():
        raise InputError("Content-Length", f"{shown(header)} is not a whole number of bytes")
    digits = text.lstrip("0")
    if not digits:
        raise InputError("request", "the body is empty; a JSON object is needed")
    if len(digits) > len(str(MAX_BODY)) or int(digits) > MAX_BODY:
        raise Refused(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body of {shown(digits)} bytes; at most {MAX_BODY} are taken"
        )
    return int(digits)


def _text_field(body: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    """``body[name]`` as a string: InputError if it is missing (where required) or of another kind."""
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InputError(name, f"must be a string, not {shown(value)}")
    return value


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def say_failure(handler: BaseHTTPRequestHandler, error: BaseException) -> None:
    """One line on the console for a request that failed in the server (never a traceback)."""
    sys.stderr.write(f"review server: {handler.command} {shown(handler.path)} failed: {one_line(error)}\n")


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


class ReviewServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose errors outside a request's answer (a client gone mid-reply, a
    timeout) take one line on the console rather than a traceback."""

    daemon_threads = True
    hosts: frozenset[str] = frozenset()  # the Host header values it answers (review_server sets them)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)) or error is None:
            return  # the client went away or stalled: nothing to say
        sys.stderr.write(f"review server: a request from {client_address[0]} failed: {one_line(error)}\n")


def allowed_hosts(host: str, port: int, names: Iterable[str] = ()) -> frozenset[str]:
    """The Host header values a server on ``host:port`` answers: the loopback names, ``host``
    itself (an IPv6 address in brackets), ``names`` (other names it is reached by), and where it
    listens on every address, this machine's host names; each as ``name:port``, and as ``name``
    alone on port 80 (browsers leave the default port out)."""
    bases = {*LOOPBACK_NAMES, *names}
    if host in WILDCARD_ADDRESSES:
        bases |= {socket.gethostname(), socket.getfqdn()}
    else:
        bases.add(f"[{host}]" if ":" in host and not host.startswith("[") else host)
    values = {f"{name.lower()}:{port}" for name in bases if name}
    if port == 80:
        values |= {name.lower() for name in bases if name}
    return frozenset(values)


def review_server(app: ReviewApp, host: str = "127.0.0.1", port: int = 8765, names: Iterable[str] = ()) -> ReviewServer:
    """A server for ``app`` bound to ``host:port`` (port 0: any free one), not yet serving; it
    answers requests whose Host is one of ``allowed_hosts(host, port, names)`` (its ``hosts``)."""
    handler = type("BoundReviewHandler", (ReviewHandler,), {"app": app})
    server = ReviewServer((host, port), handler)
    server.hosts = allowed_hosts(host, server.server_address[1], names)
    return server
