"""`cxr-miner review` and `cxr-miner reviews export`: reviewers' verdicts on a release's boxes.

Orchestration only: the release and the collection come from storage (the ingest report's root,
the index's source paths), the server and the store are storage's (``releases.review_server``,
``releases.reviews``). No Prefect flow: a review is a person at a browser, not a scheduled stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cxr_miner.storage.releases.release import BOXES_FILE, release_file
from cxr_miner.storage.releases.review_server import WILDCARD_ADDRESSES, ReviewApp, review_server
from cxr_miner.storage.releases.reviews import REVIEWS_FILE, ReviewStore, export_reviews
from cxr_miner.storage.stages.index import INDEX_FILE, read_index, read_ingest_report
from cxr_miner.storage.vocab.errors import MissingInput

EXPORT_DIR = "reviews"


def review_app(release: Path, workdir: Path, reviewer: str = "", root: Path | None = None) -> ReviewApp:
    """The review of ``release`` (RELEASES/<version> or RELEASES/latest) made from ``workdir``:
    its images under ``root`` (default: the collection ingest read), verdicts in W/reviews.sqlite."""
    release_file(release, BOXES_FILE)
    sources = read_index(workdir / INDEX_FILE).select(["image_id", "source_path"]).to_pydict()
    collection = root or Path(read_ingest_report(workdir)["root"])
    return ReviewApp(
        release,
        collection,
        dict(zip(sources["image_id"], sources["source_path"])),
        workdir / REVIEWS_FILE,
        reviewer,
    )


def serve_review(
    app: ReviewApp, host: str, port: int, ready: Callable[[str, list[str]], None], names: Sequence[str] = ()
) -> None:
    """Serve ``app`` until interrupted; ``ready`` gets the page's URL and the Host values the server
    answers (``names`` besides the loopback names and ``host``) once it listens."""
    server = review_server(app, host, port, names)
    bound_port = server.server_address[1]
    shown_host = "127.0.0.1" if host in WILDCARD_ADDRESSES else (f"[{host}]" if ":" in host else host)
    ready(f"http://{shown_host}:{bound_port}/", sorted(server.hosts))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def export(workdir: Path, out: Path | None = None) -> tuple[Path, dict[str, int]]:
    """W/reviews.sqlite -> ``out`` (default W/reviews/): reviews.parquet and reviewed.json."""
    store_path = workdir / REVIEWS_FILE
    if not store_path.exists():
        raise MissingInput(f"{store_path}: no reviews yet (run `cxr-miner review RELEASES/<version> --workdir W`)")
    target = out or workdir / EXPORT_DIR
    with ReviewStore(store_path) as store:
        return target, export_reviews(store, target)
