"""The review server on a hand-made release: its queue, its refusals (paths outside the release,
links, writes without the page's token or from another origin, unknown boxes), and the page in
headless Chromium judged with the keyboard and the mouse, the store read back afterwards."""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr_miner.storage.releases.release import BOXES_FILE, release_rows
from cxr_miner.storage.releases.review_server import ReviewApp, allowed_hosts, review_server
from cxr_miner.storage.releases.reviews import REVIEWS_FILE, ReviewStore
from cxr_miner.storage.stages.harvest import PART_SCHEMA

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
VERSION = "20261205T000000Z"
SIZES = {"e0.png": (400, 200), "e1.png": (400, 200), "m0.png": (300, 300)}


def _box(image, finding, rank, xyxy, confidence=None, score=0.5):
    x0, y0, x1, y1 = xyxy
    return {
        "image_id": image, "finding": finding, "rank": rank, "rule_rank": rank,
        "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1, "score": score, "probability": 0.9,
        "confidence": confidence, "at_operating_point": False, "method": "am", "model_id": "t@abc",
    }  # fmt: skip


BOXES = [
    _box("e0.png", "Edema", 1, (40, 20, 200, 120), score=0.9),
    _box("e0.png", "Edema", 2, (220, 40, 380, 180), score=0.4),
    _box("e1.png", "Edema", 1, (10, 10, 100, 100), score=0.7),
    _box("m0.png", "Mass", 1, (100, 100, 160, 150), confidence=0.8),
]


@pytest.fixture
def review(tmp_path):
    """A release of 4 boxes (Edema without confidence, Mass with), its images, and a server on a
    free port: yields (app, base URL)."""
    root = tmp_path / "root"
    root.mkdir()
    for name, (width, height) in SIZES.items():
        ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
        Image.fromarray(ramp).save(root / name)
    images = pa.table(
        {
            "image_id": list(SIZES),
            "patient_id": ["1", "1", "2"],
            "split": ["train"] * 3,
            "source_path": list(SIZES),
            "width": pa.array([w for w, _ in SIZES.values()], pa.int32()),
            "height": pa.array([h for _, h in SIZES.values()], pa.int32()),
        }
    )
    release = tmp_path / "releases" / VERSION
    (release / "report").mkdir(parents=True)
    pq.write_table(release_rows(pa.Table.from_pylist(BOXES, schema=PART_SCHEMA), images), release / BOXES_FILE)
    (release / "report" / "index.html").write_text("<title>report</title>")
    (tmp_path / "secret.txt").write_text("not for reviewers")
    (release / "report" / "leak.html").symlink_to(tmp_path / "secret.txt")
    app = ReviewApp(release, root, {name: name for name in SIZES}, tmp_path / REVIEWS_FILE, reviewer="")
    server = review_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def _status(url, data=None, headers=None):
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post(base, path, body, token, **headers):
    all_headers = {"Content-Type": "application/json", **({"X-Review-Token": token} if token else {}), **headers}
    return _status(base + path, json.dumps(body).encode(), all_headers)


def test_the_queue_puts_findings_without_confidence_first_and_skips_judged_boxes(review):
    app, base = review
    state = json.loads(_get(base + "/api/state")[1])
    assert [(f["finding"], f["boxes"], f["has_confidence"]) for f in state["findings"]] == [
        ("Edema", 3, False),
        ("Mass", 1, True),
    ]
    assert state["sampler"].startswith("stratified by confidence")
    first = json.loads(_get(base + "/api/next?finding=Edema&reviewer=ann")[1])
    assert first["image_url"] == f"/image/{first['box_id']}" and first["finding"] == "Edema"
    status, png = _get(base + first["image_url"])
    assert status == 200 and Image.open(io.BytesIO(png)).size == SIZES[first["image_id"]]
    assert (
        _post(base, "/api/verdict", {"box_id": first["box_id"], "verdict": "skip", "reviewer": "ann"}, app.token)[0]
        == 200
    )
    after_skip = json.loads(_get(base + "/api/next?finding=Edema&reviewer=ann")[1])
    assert after_skip["box_id"] != first["box_id"]  # ann skipped it; bob is still offered it
    assert json.loads(_get(base + "/api/next?finding=Edema&reviewer=bob")[1])["box_id"] == first["box_id"]


def test_paths_outside_the_release_and_links_are_refused(review):
    _, base = review
    assert _get(base + "/release/report/index.html") == (200, b"<title>report</title>")
    for path in (
        "/release/../secret.txt",
        "/release/%2e%2e/secret.txt",
        "/release/report/leak.html",
        "/release//etc/passwd",
    ):
        status, body = _status(base + path)
        assert status == 403 and "secret" not in json.dumps(body).replace("secret.txt", ""), (path, status, body)
    assert _status(base + "/release/report/none.html")[0] == 404


def test_writes_need_the_pages_token_and_origin_and_a_known_box(review, tmp_path):
    app, base = review
    box_id = json.loads(_get(base + "/api/next?finding=Mass&reviewer=ann")[1])["box_id"]
    accept = {"box_id": box_id, "verdict": "accept", "reviewer": "ann"}
    assert _post(base, "/api/verdict", accept, None)[0] == 403
    assert _post(base, "/api/verdict", accept, "wrong-token")[0] == 403
    assert _post(base, "/api/verdict", accept, app.token, Origin="http://evil.example")[0] == 403
    status, body = _post(base, "/api/verdict", {**accept, "box_id": "0123456789abcdef"}, app.token)
    assert status == 400 and "no box '0123456789abcdef' in this release" in body["error"]
    status, body = _post(base, "/api/verdict", {**accept, "verdict": "redraw", "box": [0, 0, 900, 10]}, app.token)
    assert status == 400 and "not a box with area inside the 300 x 300 image m0.png" in body["error"]
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        assert store.rows().num_rows == 0
    assert _post(base, "/api/verdict", accept, app.token, Origin=base)[0] == 200
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        assert [(r["box_id"], r["verdict"]) for r in store.current()] == [(box_id, "accept")]


@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CXR_MINER_REQUIRE_BROWSER"),
    reason="Debian's chromium and chromium-driver are not installed (make test installs them)",
)
def test_a_reviewer_judges_with_keys_and_mouse_and_the_store_holds_exactly_that(review, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, base = review
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    wait = WebDriverWait(driver, 20)

    def shown() -> str:
        return driver.execute_script("return document.body.dataset.box || ''")

    def next_after(previous: str) -> str:
        wait.until(lambda d: shown() != previous)
        return shown()

    try:
        driver.set_window_size(1200, 1000)
        driver.get(base + "/")
        name = driver.find_element(By.ID, "reviewer")
        name.send_keys("ann\n")
        body = driver.find_element(By.TAG_NAME, "body")
        first = next_after("")
        body.send_keys("a")
        second = next_after(first)
        body.send_keys("r")
        third = next_after(second)
        image = driver.find_element(By.ID, "image")
        rect = driver.execute_script("return arguments[0].getBoundingClientRect().toJSON()", image)
        actions = ActionChains(driver)
        actions.w3c_actions.pointer_action.move_to_location(int(rect["left"]) + 20, int(rect["top"]) + 30)
        actions.w3c_actions.pointer_action.pointer_down()
        actions.w3c_actions.pointer_action.move_to_location(int(rect["left"]) + 120, int(rect["top"]) + 90)
        actions.w3c_actions.pointer_action.pointer_up()
        actions.perform()
        body.send_keys("d")
        wait.until(lambda d: "every box is judged" in d.find_element(By.ID, "about").text)
        driver.find_element(By.CSS_SELECTOR, "[data-finding='Mass']").click()
        mass = next_after("")
        driver.find_element(By.CSS_SELECTOR, "[data-verdict='accept']").click()
        wait.until(
            lambda d: (
                "every box is judged" in d.find_element(By.ID, "about").text
                and "Mass" in d.find_element(By.ID, "about").text
            )
        )
        body.send_keys("u")
        wait.until(lambda d: "undone: accept" in d.find_element(By.ID, "status").text)
        scale = app.details[third]["image_width"] / rect["width"]
        # another reviewer's verdict shows in this page's counts by the next poll
        with ReviewStore(tmp_path / REVIEWS_FILE) as store:
            store.record(VERSION, app.boxes, mass, "reject", "bob")
        wait.until(lambda d: "Mass: 1/1 (a 0, r 1" in d.find_element(By.ID, "findings").text)
    finally:
        driver.quit()
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        now = {row["box_id"]: row for row in store.current(VERSION)}
        history = store.rows().to_pylist()
    assert {b: (r["verdict"], r["reviewer"]) for b, r in now.items()} == {
        first: ("accept", "ann"), second: ("reject", "ann"), third: ("redraw", "ann"), mass: ("reject", "bob"),
    }  # fmt: skip
    drawn = [now[third][k] for k in ("x_min", "y_min", "x_max", "y_max")]
    np.testing.assert_allclose(drawn, [20 * scale, 30 * scale, 120 * scale, 90 * scale], atol=scale + 0.5)
    assert [(r["box_id"], r["verdict"], r["undone"]) for r in history if r["box_id"] == mass] == [
        (mass, "accept", True),
        (mass, "reject", False),
    ]
    assert len({first, second, third}) == 3 and {app.details[b]["finding"] for b in (first, second, third)} == {"Edema"}


def _raw(base, method, path, body=b"", headers=None):
    """One request with exactly these headers (Host included, http.client adds none of its own):
    (status, JSON body or text); status None when the server dropped the connection unanswered."""
    port = int(base.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        payload = response.read()
    except (ConnectionError, http.client.HTTPException):
        return None, None
    finally:
        connection.close()
    try:
        return response.status, json.loads(payload)
    except ValueError:
        return response.status, payload.decode("utf-8", "replace")


def _write_headers(base, app, body, **extra):
    host = base.removeprefix("http://")
    return {"Host": host, "X-Review-Token": app.token, "Content-Length": str(len(body)), **extra}


def test_a_request_naming_another_host_is_refused_before_anything_is_served(review, tmp_path):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends Host
    evil.example:PORT. It must get neither the page (its write token) nor a write, even with an
    Origin that equals its Host."""
    app, base = review
    port = base.rsplit(":", 1)[1]
    status, page = _raw(base, "GET", "/", headers={"Host": f"evil.example:{port}"})
    assert status == 421 and app.token not in json.dumps(page)
    assert f"127.0.0.1:{port}" in page["error"] and "evil.example" in page["error"]
    for path in ("/api/state", "/release/report/index.html", "/api/next?finding=Mass&reviewer=x"):
        assert _raw(base, "GET", path, headers={"Host": f"evil.example:{port}"})[0] == 421, path
    assert _raw(base, "GET", "/", headers={})[0] == 421  # no Host at all (HTTP/1.0 style)
    assert _raw(base, "GET", "/", headers={"Host": "127.0.0.1"})[0] == 421  # the port is part of the name
    box_id = json.loads(_get(base + "/api/next?finding=Mass&reviewer=ann")[1])["box_id"]
    body = json.dumps({"box_id": box_id, "verdict": "accept", "reviewer": "eve"}).encode()
    evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    assert _raw(base, "POST", "/api/verdict", body, _write_headers(base, app, body, **evil))[0] == 421
    other_origin = {"Origin": f"http://evil.example:{port}"}
    assert _raw(base, "POST", "/api/verdict", body, _write_headers(base, app, body, **other_origin))[0] == 403
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        assert store.rows().num_rows == 0
    # the names it was started for: 127.0.0.1, localhost (any case), with its port; Origin likewise
    for host in (f"127.0.0.1:{port}", f"LocalHost:{port}"):
        status, page = _raw(base, "GET", "/", headers={"Host": host})
        assert status == 200 and app.token in page, host
    ok = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    assert _raw(base, "POST", "/api/verdict", body, _write_headers(base, app, body, **ok)) == (200, {"stored": 1})


def test_the_hosts_a_server_answers_are_its_loopback_names_its_address_and_the_names_given():
    assert allowed_hosts("127.0.0.1", 8765) == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert allowed_hosts("10.1.2.3", 80, ["Review.Lab"]) == {
        *(
            f"{name}{port}"
            for name in ("127.0.0.1", "localhost", "[::1]", "10.1.2.3", "review.lab")
            for port in ("", ":80")
        )
    }
    assert "[fe80::1]:9000" in allowed_hosts("fe80::1", 9000)
    everywhere = allowed_hosts("0.0.0.0", 9000)
    assert f"{socket.gethostname().lower()}:9000" in everywhere and "0.0.0.0:9000" not in everywhere


MALFORMED = {
    "a box that is a number": {"box": 5},
    "a box that is a string": {"box": "abcd"},
    "a box with a string": {"box": ["a", 1, 2, 3]},
    "a box with a null": {"box": [None, 1, 2, 3]},
    "a box with a bool": {"box": [True, 1, 2, 3]},
    "a box with 3 numbers": {"box": [1, 2, 3]},
    "a box with a nested list": {"box": [[1], 2, 3, 4]},
    "a box beyond a float": {"box": [10**400, 1, 2, 3]},
    "a box id that is a list": {"box_id": ["x"]},
    "a verdict that is a number": {"verdict": 3},
    "a reviewer that is an object": {"reviewer": {"name": "ann"}},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_verdict_gets_a_4xx_with_its_reason_and_nothing_is_stored(review, tmp_path, capfd, case):
    app, base = review
    box_id = json.loads(_get(base + "/api/next?finding=Mass&reviewer=ann")[1])["box_id"]
    verdict = {"box_id": box_id, "verdict": "redraw", "reviewer": "ann", **MALFORMED[case]}
    body = json.dumps(verdict).encode()
    status, answer = _raw(base, "POST", "/api/verdict", body, _write_headers(base, app, body))
    assert status == 400 and "\n" not in answer["error"], (case, status, answer)
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        assert store.rows().num_rows == 0
    assert capfd.readouterr().err == ""  # nothing on the console, above all no traceback


def test_bodies_and_lengths_that_are_not_json_get_a_4xx_and_the_console_stays_quiet(review, tmp_path, capfd):
    app, base = review
    deep = b"[" * 30_000 + b"]" * 30_000
    cases = {
        "abc": (b'{"box_id": "x"}', {"Content-Length": "abc"}, 400),
        "negative": (b'{"box_id": "x"}', {"Content-Length": "-5"}, 400),
        "a huge length": (b"{}", {"Content-Length": "9" * 5000}, 413),
        "zero": (b"", {"Content-Length": "0"}, 400),
        "none": (b"", {"Content-Length": None}, 411),
        "30,000 deep": (deep, {}, 400),
        "not UTF-8": (b'{"box_id": "\xff\xfe"}', {}, 400),
        "not an object": (b"[1, 2]", {}, 400),
        "NaN corners": (b'{"box_id": "x", "verdict": "redraw", "reviewer": "a", "box": [NaN, 0, 1, 1]}', {}, 400),
    }
    for case, (body, headers, expected) in cases.items():
        sent = {k: v for k, v in {**_write_headers(base, app, body), **headers}.items() if v is not None}
        status, answer = _raw(base, "POST", "/api/verdict", body, sent)
        assert status == expected and isinstance(answer, dict) and "\n" not in answer["error"], (case, status, answer)
    assert _raw(base, "GET", "/release/report/a%00b.html", headers={"Host": base.removeprefix("http://")})[0] == 403
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        assert store.rows().num_rows == 0
    assert capfd.readouterr().err == ""


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def verdict_like(box_ids: list[str]) -> st.SearchStrategy[dict]:
    """Verdict bodies, well-formed and not: a real box id (so the checks past it run) or any
    JSON, any verdict, any reviewer, boxes of numbers or of anything."""
    return st.fixed_dictionaries(
        {},
        optional={
            "box_id": st.sampled_from(box_ids) | JSON_VALUES,
            "verdict": st.sampled_from(["accept", "reject", "redraw", "skip"]) | JSON_VALUES,
            "reviewer": st.text(max_size=5) | JSON_VALUES,
            "box": st.lists(st.floats() | st.integers() | JSON_VALUES, min_size=4, max_size=4) | JSON_VALUES,
        },
    )


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _answered_in_2xx_or_4xx(base, app, path, body, **headers):
    status, answer = _raw(base, "POST", path, body, {**_write_headers(base, app, body), **headers})
    assert status is not None and 200 <= status < 500, (status, answer, body[:200])


@FUZZ
@given(body=st.binary(max_size=300))
def test_any_bytes_posted_get_a_2xx_or_4xx(review, body):
    app, base = review
    _answered_in_2xx_or_4xx(base, app, "/api/verdict", body)
    _answered_in_2xx_or_4xx(base, app, "/api/undo", body)


@FUZZ
@given(data=st.data())
def test_any_json_verdict_gets_a_2xx_or_4xx(review, data):
    app, base = review
    body = json.dumps(data.draw(verdict_like(sorted(app.boxes)))).encode()
    _answered_in_2xx_or_4xx(base, app, "/api/verdict", body)


def _half_closed(base, path, body, headers):
    """POST ``body`` with exactly ``headers``, then close our sending side (as a client that has
    nothing more to send): a length beyond the body then reads as the body's end, not a wait.
    The status of the answer, None when the connection closed unanswered."""
    port = int(base.rsplit(":", 1)[1])
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else None


@FUZZ
@given(length=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30))
@example(length="20")  # one byte more than sent: read as the body's end once the client has closed
@example(length="65536")
def test_any_content_length_gets_a_2xx_or_4xx(review, length):
    app, base = review
    body = b'{"reviewer": "ann"}'
    status = _half_closed(base, "/api/undo", body, {**_write_headers(base, app, body), "Content-Length": length})
    assert status is not None and 200 <= status < 500, (status, length)
