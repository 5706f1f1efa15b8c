"""harness/fetch: downloads over a loopback HTTP server, safe extraction, atomic installs and
the MTD / mSTC converters (MTD on the real files in ../shared/data/mtd when present)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from harness import fetch as F
from harness.fetch import downloader as fetch_download
from harness.fetch import install as fetch_install
from harness.fetch import unpack as fetch_unpack
from harness.errors import FetchError

REPO = Path(__file__).resolve().parent.parent
CARDS = REPO / "datasets"
SHARED_MTD = REPO.parent / "shared" / "data" / "mtd"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Loopback HTTP server


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent, first time only
    ignore_range: bool = False
    content_type: dict[str, str] = field(default_factory=dict)  # path -> Content-Type
    etags: dict[str, str] = field(default_factory=dict)  # path -> ETag (If-Range is honoured)
    no_length: set[str] = field(default_factory=set)  # paths sent without Content-Length


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request per connection, Range support unless told to ignore it."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        wanted = self.headers.get("Range")
        state.requests.append((self.path, wanted))
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range != state.etags.get(self.path):
            wanted = None  # the file changed since the partial was saved: send it whole
        if wanted and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if self.path not in state.no_length:
            self.send_header("Content-Length", str(len(body)))
        if self.path in state.content_type:
            self.send_header("Content-Type", state.content_type[self.path])
        if self.path in state.etags:
            self.send_header("ETag", state.etags[self.path])
        self.end_headers()
        cut = state.drop_after.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])  # then the connection closes


@pytest.fixture
def server():
    """A loopback server in a daemon thread; it shuts itself down after 60 s at the latest."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.timeout = 5
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    deadline = threading.Timer(60, httpd.shutdown)
    deadline.daemon = True
    deadline.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield httpd
    finally:
        deadline.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch):
    monkeypatch.delenv(F.MIRROR_ENV, raising=False)
    monkeypatch.setattr(fetch_download, "_RETRY_PAUSE_S", 0.0)


PAYLOAD = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()


# ----------------------------------------------------------------------------------------------
# download()


def test_download_verifies_checksum(server, tmp_path):
    server.state.files["/f.bin"] = PAYLOAD
    dest = F.download(f"{server.base}/f.bin", tmp_path / "f.bin", sha256(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.bin.part").exists()


def test_download_checksum_mismatch_names_both_hashes_and_deletes(server, tmp_path):
    server.state.files["/f.bin"] = PAYLOAD
    wrong = "0" * 64
    with pytest.raises(FetchError) as err:
        F.download(f"{server.base}/f.bin", tmp_path / "f.bin", wrong, progress=False)
    assert wrong in str(err.value) and sha256(PAYLOAD) in str(err.value)
    assert "f.bin" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_download_resumes_with_range_after_a_dropped_connection(server, tmp_path):
    server.state.files["/f.bin"] = PAYLOAD
    server.state.drop_after["/f.bin"] = 70_000
    url, dest = f"{server.base}/f.bin", tmp_path / "f.bin"
    with pytest.raises(FetchError, match="interrupted"):
        F.download(url, dest, sha256(PAYLOAD), progress=False, retries=0)
    assert (tmp_path / "f.bin.part").stat().st_size == 70_000 and not dest.exists()

    F.download(url, dest, sha256(PAYLOAD), progress=False, retries=0)
    assert server.state.requests == [("/f.bin", None), ("/f.bin", "bytes=70000-")]
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()


def test_download_retries_by_itself(server, tmp_path):
    server.state.files["/f.bin"] = PAYLOAD
    server.state.drop_after["/f.bin"] = 1234
    F.download(f"{server.base}/f.bin", tmp_path / "f.bin", sha256(PAYLOAD), False, retries=1)
    assert [r for _, r in server.state.requests] == [None, "bytes=1234-"]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    server.state.files["/f.bin"] = PAYLOAD
    server.state.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(b"junk" * 1000)  # not even a prefix of the file
    F.download(f"{server.base}/f.bin", tmp_path / "f.bin", sha256(PAYLOAD), progress=False)
    assert server.state.requests == [("/f.bin", "bytes=4000-")]
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_download_with_a_complete_part_file(server, tmp_path):
    server.state.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)  # the server answers 416 to bytes=len-
    F.download(f"{server.base}/f.bin", tmp_path / "f.bin", sha256(PAYLOAD), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_download_errors_name_the_url(server, tmp_path):
    with pytest.raises(FetchError, match="404.*missing.bin"):
        F.download(f"{server.base}/missing.bin", tmp_path / "x", progress=False)
    with pytest.raises(FetchError, match="cannot reach"):
        F.download("http://127.0.0.1:9/x.bin", tmp_path / "x", progress=False)  # discard port


def test_download_copies_local_paths_and_file_urls(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    F.download(str(src), tmp_path / "a.bin", sha256(PAYLOAD), progress=False)
    F.download(src.as_uri(), tmp_path / "b.bin", sha256(PAYLOAD), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == PAYLOAD
    with pytest.raises(FetchError, match="does not exist"):
        F.download(str(tmp_path / "nope.bin"), tmp_path / "c.bin", progress=False)


# ----------------------------------------------------------------------------------------------
# safe_extract()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode="w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


def _malicious_tar_members(outside: Path) -> dict[str, list]:
    ok = (_info("ok.txt"), b"fine")
    return {
        "dotdot": [ok, (_info("../evil.txt"), b"x")],
        "nested-dotdot": [ok, (_info("a/../../evil.txt"), b"x")],
        "absolute": [ok, (_info(str(outside / "abs.txt")), b"x")],
        "symlink-out": [ok, (_info("link", tarfile.SYMTYPE, "../outside"), None)],
        "symlink-abs": [ok, (_info("link", tarfile.SYMTYPE, str(outside)), None)],
        "write-through-symlink": [(_info("d", tarfile.DIRTYPE), None),
                                  (_info("link", tarfile.SYMTYPE, "d"), None),
                                  (_info("link/evil.txt"), b"x")],
        "symlink-chain": [(_info("a", tarfile.SYMTYPE, "."), None),
                          (_info("b", tarfile.SYMTYPE, "a/.."), None)],
        "hardlink-out": [ok, (_info("hl", tarfile.LNKTYPE, "../outside/secret"), None)],
        "device": [ok, (_info("dev", tarfile.CHRTYPE), None)],
        "fifo": [ok, (_info("pipe", tarfile.FIFOTYPE), None)],
    }


@pytest.mark.parametrize("case", sorted(_malicious_tar_members(Path("/x"))))
def test_safe_extract_refuses_malicious_tar(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    members = _malicious_tar_members(outside)[case]
    archive = _tar(tmp_path / "evil.tar.gz", members)
    target = tmp_path / "target"
    with pytest.raises(FetchError) as err:
        F.safe_extract(archive, target)
    bad_member = members[-1][0].name
    assert repr(bad_member) in str(err.value) or bad_member in str(err.value)
    assert list(outside.iterdir()) == []
    assert list(target.iterdir()) == []  # every member is checked before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "outside", "target"]


def _zip_with(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name, data, mode", [
    ("../evil.txt", b"x", None),
    ("/abs_evil.txt", b"x", None),
    ("a/../../evil.txt", b"x", None),
    ("link", b"../outside", stat.S_IFLNK | 0o777),
    ("link", b"/etc", stat.S_IFLNK | 0o777),
    ("dev", b"", stat.S_IFCHR | 0o644),
])
def test_safe_extract_refuses_malicious_zip(tmp_path, name, data, mode):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = _zip_with(tmp_path / "evil.zip", [("ok.txt", b"fine", None), (name, data, mode)])
    target = tmp_path / "target"
    with pytest.raises(FetchError, match=re.escape(repr(name))):
        F.safe_extract(archive, target)
    assert list(outside.iterdir()) == [] and list(target.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/abs_evil.txt").exists()


@pytest.mark.parametrize("mode", ["w:gz", "w:xz", "w:bz2", "w"])
def test_safe_extract_tar_formats(tmp_path, mode):
    members = [(_info("top/a.txt"), b"a"), (_info("top/alias", tarfile.SYMTYPE, "a.txt"), None)]
    archive = _tar(tmp_path / "ok.tar", members, mode)
    F.safe_extract(archive, tmp_path / "t")
    assert (tmp_path / "t/top/a.txt").read_bytes() == b"a"
    assert os.readlink(tmp_path / "t/top/alias") == "a.txt"


def test_safe_extract_zip(tmp_path):
    archive = _zip_with(tmp_path / "ok.zip", [("top/", b"", None), ("top/a.txt", b"a", None),
                                              ("top/alias", b"a.txt", stat.S_IFLNK | 0o777)])
    F.safe_extract(archive, tmp_path / "t")
    assert (tmp_path / "t/top/a.txt").read_bytes() == b"a"
    alias = tmp_path / "t/top/alias"
    assert alias.is_symlink() and alias.read_bytes() == b"a"


def test_safe_extract_rejects_non_archives(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(b"<html>not found</html>")
    with pytest.raises(FetchError, match="neither a tar nor a zip"):
        F.safe_extract(tmp_path / "x.tar.gz", tmp_path / "t")


# ----------------------------------------------------------------------------------------------
# fetch(): a toy dataset in the MVTec layout served on loopback


def _png(value: int, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


TOY_TREE = {
    "widget/train/good/000.png": _png(10), "widget/train/good/001.png": _png(11),
    "widget/train/good/002.png": _png(12), "widget/test/good/000.png": _png(13),
    "widget/test/crack/000.png": _png(14), "widget/test/crack/001.png": _png(15),
    "widget/ground_truth/crack/000_mask.png": _png(255),
    "widget/ground_truth/crack/001_mask.png": _png(0),
    "license.txt": b"toy licence",
}


def _toy_archive(path: Path) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in TOY_TREE.items():
            info = tarfile.TarInfo(f"toy_release/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.fixture
def toy(tmp_path, server):
    """A served toy archive plus a card for it; returns a namespace of paths and helpers."""
    archive = _toy_archive(tmp_path / "toy.tar.gz")
    server.state.files["/upstream/toy.tar.gz"] = archive
    cards = tmp_path / "cards"
    cards.mkdir()

    def write_card(digest: str | None) -> None:
        card = {
            "name": "toy", "format": "mvtec", "revision": "r1", "classes": ["widget"],
            "files": [{"role": "archive", "filename": "toy.tar.gz", "sha256": digest,
                       "url": f"{server.base}/upstream/toy.tar.gz", "extract": True}],
            "expected_counts": {"widget": {"train": 3, "test_good": 1, "test_defective": 2,
                                           "masks": 2}},
        }
        (cards / "toy.yaml").write_text(json.dumps(card))  # JSON is YAML

    write_card(sha256(archive))

    data = tmp_path / "data"

    def fetch_toy(**kwargs) -> Path:
        return F.fetch("toy", data, cards_dir=cards, progress=False, **kwargs)

    return SimpleNamespace(archive=tmp_path / "toy.tar.gz", sha=sha256(archive), cards=cards,
                           data=data, write_card=write_card, server=server, fetch=fetch_toy)


def _leftovers(data_root: Path) -> list[str]:
    if not data_root.exists():
        return []
    # The lock file stays by design: deleting a file another process may be locking breaks the lock.
    return sorted(p.name for p in data_root.iterdir() if p.name.startswith(".") and p.suffix != ".lock")


def _assert_toy_installed(root: Path) -> None:
    counts = F.count_layout(root)
    assert counts["widget"]["train"] == 3 and counts["widget"]["test"] == {"crack": 2, "good": 1}
    assert (root / "widget/ground_truth/crack/000_mask.png").read_bytes() == _png(255)
    assert (root / "license.txt").read_bytes() == b"toy licence"
    marker = F.read_marker(root)
    assert marker["revision"] == "r1" and marker["classes"]["widget"]["masks"] == 2


def test_fetch_over_http_installs_and_then_returns_at_once(toy):
    root = toy.fetch()
    assert root == toy.data / "toy"
    _assert_toy_installed(root)
    assert F.read_marker(root)["files"] == {"toy.tar.gz": toy.sha}
    assert _leftovers(toy.data) == []  # no scratch folders, downloads deleted
    n = len(toy.server.state.requests)
    assert toy.fetch() == root and len(toy.server.state.requests) == n
    assert "widget" in F.format_summary(F.read_marker(root))


def test_fetch_with_wrong_checksum_installs_nothing(toy):
    toy.write_card("0" * 64)
    with pytest.raises(FetchError) as err:
        toy.fetch()
    assert "0" * 64 in str(err.value) and toy.sha in str(err.value)
    assert not (toy.data / "toy").exists()
    assert [p for p in toy.data.rglob("*") if p.is_file() and p.suffix != ".lock"] == []


def test_fetch_unpinned_prints_the_sha256(toy, capsys):
    toy.write_card(None)
    F.fetch("toy", toy.data, cards_dir=toy.cards, progress=True)
    assert toy.sha in capsys.readouterr().err


def test_fetch_from_sources(toy, tmp_path, monkeypatch):
    # a local archive file
    _assert_toy_installed(toy.fetch(source=str(toy.archive)))
    # a folder already extracted (copied, the folder itself untouched)
    extracted = tmp_path / "extracted"
    F.safe_extract(toy.archive, extracted)
    before = sorted(p.relative_to(extracted) for p in extracted.rglob("*"))
    _assert_toy_installed(toy.fetch(source=str(extracted), force=True))
    assert sorted(p.relative_to(extracted) for p in extracted.rglob("*")) == before
    # a mirror base URL, then the FLOWAD_MIRROR variable; the upstream URL is never asked
    toy.server.state.files["/mirror/toy.tar.gz"] = toy.archive.read_bytes()
    _assert_toy_installed(toy.fetch(source=f"{toy.server.base}/mirror/", force=True))
    monkeypatch.setenv(F.MIRROR_ENV, f"{toy.server.base}/mirror")
    _assert_toy_installed(toy.fetch(force=True))
    # a local mirror folder holding the archive by name
    monkeypatch.setenv(F.MIRROR_ENV, str(tmp_path))
    _assert_toy_installed(toy.fetch(force=True))
    assert [p for p, _ in toy.server.state.requests] == ["/mirror/toy.tar.gz"] * 2


def test_fetch_crash_in_conversion_leaves_nothing_that_looks_complete(toy, monkeypatch):
    def crash(raw_root, out_root, classes, move=False):
        (Path(out_root) / "widget" / "train").mkdir(parents=True)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(fetch_install, "convert_mvtec", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        toy.fetch()
    assert not (toy.data / "toy").exists() and F.read_marker(toy.data / "toy") is None
    assert [p for p in _leftovers(toy.data) if p != ".downloads"] == []
    monkeypatch.undo()
    monkeypatch.setattr(fetch_download, "_RETRY_PAUSE_S", 0.0)
    _assert_toy_installed(toy.fetch())  # the kept download is reused


def test_fetch_crash_during_reinstall_keeps_the_old_install(toy, monkeypatch):
    root = toy.fetch()
    old_marker = (root / F.MARKER).read_bytes()
    old_files = sorted(p.relative_to(root) for p in root.rglob("*"))

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(fetch_install, "check_counts", crash)  # after conversion, before the swap
    with pytest.raises(RuntimeError):
        toy.fetch(force=True)
    assert (root / F.MARKER).read_bytes() == old_marker
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == old_files
    assert [p for p in _leftovers(toy.data) if p != ".downloads"] == []


def test_fetch_restores_an_install_moved_aside_by_a_crash(toy):
    root = toy.fetch()
    moved = toy.data / ".toy.old-1-2"
    os.replace(root, moved)  # as if the process died between the two renames
    n = len(toy.server.state.requests)
    assert toy.fetch() == root and not moved.exists()
    assert len(toy.server.state.requests) == n
    _assert_toy_installed(root)


def test_fetch_treats_a_folder_without_marker_as_absent(toy):
    stray = toy.data / "toy"
    (stray / "widget").mkdir(parents=True)
    (stray / "widget" / "half.png").write_bytes(b"x")
    with pytest.raises(FetchError, match="force"):
        toy.fetch()
    assert (stray / "widget" / "half.png").exists()
    _assert_toy_installed(toy.fetch(force=True))
    assert not (stray / "widget" / "half.png").exists()


def test_fetch_reinstalls_when_the_card_revision_changes(toy):
    toy.fetch()
    card = json.loads((toy.cards / "toy.yaml").read_text())
    card["revision"] = "r2"
    (toy.cards / "toy.yaml").write_text(json.dumps(card))
    root = toy.fetch()
    assert F.read_marker(root)["revision"] == "r2"


def test_fetch_rejects_counts_that_differ_from_the_card(toy):
    card = json.loads((toy.cards / "toy.yaml").read_text())
    card["expected_counts"]["widget"]["train"] = 4
    (toy.cards / "toy.yaml").write_text(json.dumps(card))
    with pytest.raises(FetchError, match="widget train: expected 4, got 3"):
        toy.fetch()
    assert not (toy.data / "toy").exists()


def test_fetch_per_class_archives_keep_installed_classes(tmp_path, server):
    trees = {}
    for cls in ("alpha", "beta"):
        path = tmp_path / f"{cls}.tar.xz"
        with tarfile.open(path, "w:xz") as tar:
            for name in ("train/good/0.png", "test/good/0.png"):
                data = _png(1)
                info = tarfile.TarInfo(f"{cls}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        trees[cls] = path.read_bytes()
        server.state.files[f"/{cls}.tar.xz"] = trees[cls]
    card = {"name": "duo", "format": "mvtec", "revision": "r1", "classes": ["alpha", "beta"],
            "files": [{"role": "archive", "filename": "duo.tar.xz",
                       "url": f"{server.base}/duo.tar.xz"}],
            "class_files": {c: {"filename": f"{c}.tar.xz", "url": f"{server.base}/{c}.tar.xz",
                                "sha256": sha256(trees[c])} for c in trees}}
    (tmp_path / "duo.yaml").write_text(json.dumps(card))

    def fetch(**kwargs) -> Path:
        return F.fetch("duo", tmp_path / "data", cards_dir=tmp_path, progress=False, **kwargs)

    fetch(classes=["alpha"])
    root = fetch(classes=["beta"])
    assert sorted(F.read_marker(root)["classes"]) == ["alpha", "beta"]
    assert [p for p, _ in server.state.requests] == ["/alpha.tar.xz", "/beta.tar.xz"]
    with pytest.raises(FetchError, match="gamma"):
        fetch(classes=["gamma"])


# ----------------------------------------------------------------------------------------------
# Dataset cards


def test_cards_load_and_hold_the_pinned_facts():
    mvtec, mtd, mstc = (F.load_card(n, CARDS) for n in ("mvtec_ad", "mtd", "mstc"))
    assert mvtec["files"][0]["sha256"] == (
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d")
    assert len(mvtec["classes"]) == 15 and set(mvtec["class_files"]) == set(mvtec["classes"])
    counts = mvtec["expected_counts"].values()
    assert sum(c["train"] for c in counts) == 3629
    assert sum(c["test_good"] + c["test_defective"] for c in counts) == 1725
    assert mvtec["resolution"]["msflow"]["per_class"]["transistor"] == [256, 256]
    assert mtd["revision"] == "cc4eb530b57b9cb7225bf76023873043ffd50655"
    assert "13529c8a79508a930df3618cf6718358a87b8719" in mtd["files"][1]["url"]
    assert mstc["files"][0]["sha256"].startswith("c13a827043b2")
    assert mstc["conversion"] == {"frame_step": 5, "protocol": "per_scene",
                                  "train_jpeg_quality": 95}
    assert mstc["resolution"]["msflow"] == [256, 384]


def test_load_card_errors_name_the_card(tmp_path):
    with pytest.raises(FetchError, match="no dataset card nope.yaml"):
        F.load_card("nope", tmp_path)
    (tmp_path / "bad.yaml").write_text("name: bad\nformat: weird\nrevision: 1\nfiles: []\n")
    with pytest.raises(FetchError, match="bad.yaml.*weird"):
        F.load_card("bad", tmp_path)


# ----------------------------------------------------------------------------------------------
# MTD on the real files


needs_mtd = pytest.mark.skipif(not (SHARED_MTD / "MT_Free").is_dir(), reason="no MTD copy here")


@pytest.fixture(scope="module")
def mtd_root(tmp_path_factory):
    return F.fetch("mtd", tmp_path_factory.mktemp("mtd_data"), source=str(SHARED_MTD),
                   cards_dir=CARDS, progress=False)


@needs_mtd
def test_mtd_split_file_matches_the_card():
    card = F.load_card("mtd", CARDS)
    split = next(e for e in card["files"] if e["role"] == "split")
    assert F.file_sha256(SHARED_MTD / "mtd_train_filenames.txt") == split["sha256"]


@needs_mtd
def test_mtd_counts_and_split(mtd_root):
    cls = mtd_root / "magnetic_tile"
    counts = F.count_layout(mtd_root)["magnetic_tile"]
    assert (counts["train"], counts["test_good"], counts["test_defective"]) == (761, 191, 392)
    assert counts["test"] == {"good": 191, "blowhole": 115, "break": 85, "crack": 57, "fray": 32,
                              "uneven": 103}
    listed = set((SHARED_MTD / "mtd_train_filenames.txt").read_text().split())
    assert {p.name for p in (cls / "train/good").iterdir()} == listed
    assert not listed & {p.name for p in (cls / "test/good").iterdir()}


@needs_mtd
def test_mtd_images_are_copied_byte_for_byte(mtd_root):
    cls = mtd_root / "magnetic_tile"
    folders = {"good": "MT_Free", "blowhole": "MT_Blowhole", "break": "MT_Break",
               "crack": "MT_Crack", "fray": "MT_Fray", "uneven": "MT_Uneven"}
    images = list((cls / "train/good").iterdir()) + list((cls / "test").glob("*/*"))
    assert len(images) == 1344
    for image in images:
        defect = "good" if image.parent.parent.name == "train" else image.parent.name
        source = SHARED_MTD / folders[defect] / "Imgs" / image.name
        assert image.read_bytes() == source.read_bytes()


@needs_mtd
def test_mtd_masks_exist_match_their_images_and_are_binary(mtd_root):
    cls = mtd_root / "magnetic_tile"
    assert not (cls / "ground_truth" / "good").exists()
    checked = 0
    for image in sorted(cls.glob("test/*/*.jpg")):
        if image.parent.name == "good":
            continue
        mask_path = cls / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
        with Image.open(image) as im, Image.open(mask_path) as mk:
            assert mk.mode == "L" and mk.size == im.size
            values = np.unique(np.asarray(mk))
        assert set(values.tolist()) <= {0, 255}
        checked += 1
    assert checked == 392
    # thresholding at 127 agrees with the source mask
    source = SHARED_MTD / "MT_Blowhole/Imgs/exp1_num_262480.png"
    ours = cls / "ground_truth/blowhole/exp1_num_262480_mask.png"
    expected = np.where(np.asarray(Image.open(source)) > 127, 255, 0)
    assert np.array_equal(np.asarray(Image.open(ours)), expected)


@needs_mtd
def test_mtd_marker_records_the_split_checksum(mtd_root):
    marker = F.read_marker(mtd_root)
    assert marker["files"]["mtd_train_filenames.txt"].startswith("ddf6ddb1b4a1")
    assert marker["revision"] == "cc4eb530b57b9cb7225bf76023873043ffd50655"


def test_mtd_split_names_must_exist(tmp_path):
    raw = tmp_path / "raw"
    for folder in ("MT_Free", *F.MTD_DEFECT_FOLDERS):
        (raw / folder / "Imgs").mkdir(parents=True)
    Image.new("L", (4, 4)).save(raw / "MT_Free/Imgs/a.jpg")
    with pytest.raises(FetchError, match="not_there.jpg"):
        F.convert_mtd(raw, tmp_path / "out", ["a.jpg", "not_there.jpg"])
    with pytest.raises(FetchError, match="twice"):
        F.convert_mtd(raw, tmp_path / "out", ["a.jpg", "a.jpg"])


# ----------------------------------------------------------------------------------------------
# mSTC on a tiny ShanghaiTech-shaped folder written here


H, W = 32, 48


def _write_video(path: Path, n_frames: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), 10 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_test_video(root: Path, video_id: str, n_frames: int, anomalous: range) -> np.ndarray:
    frames = root / "testing" / "frames" / video_id
    frames.mkdir(parents=True)
    masks = np.zeros((n_frames, H, W), np.uint8)
    for i in range(n_frames):
        Image.new("RGB", (W, H), (i, i, i)).save(frames / f"{i:03d}.jpg")
        if i in anomalous:
            masks[i, 4:12, 10:20] = 1
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    for sub, data in (("test_pixel_mask", masks), ("test_frame_mask", labels)):
        (root / "testing" / sub).mkdir(parents=True, exist_ok=True)
        np.save(root / "testing" / sub / f"{video_id}.npy", data)
    return masks


@pytest.fixture(scope="module")
def stc_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("stc") / "shanghaitech"
    (root / "training" / "videos").mkdir(parents=True)
    for video in ("01_001", "02_001"):
        _write_video(root / "training" / "videos" / f"{video}.avi", 12)
    masks = {
        "01_0014": _write_test_video(root, "01_0014", 12, range(4, 7)),
        "02_0001": _write_test_video(root, "02_0001", 7, range(0)),
        "03_0001": _write_test_video(root, "03_0001", 6, range(0)),  # no training video
    }
    return root, masks


def test_mstc_conversion_per_scene(stc_raw, tmp_path):
    raw, masks = stc_raw
    root = F.fetch("mstc", tmp_path / "data", source=str(raw.parent), cards_dir=CARDS,
                   progress=False)
    counts = F.count_layout(root)
    assert sorted(counts) == ["scene_01", "scene_02"]
    assert counts["scene_01"]["train"] == 3 and counts["scene_02"]["train"] == 3
    assert counts["scene_01"]["test"] == {"anomaly": 1, "good": 2}
    assert counts["scene_02"]["test"] == {"good": 2}
    s1 = root / "scene_01"
    assert sorted(p.name for p in (s1 / "train/good").iterdir()) == [
        "01_001_0000.jpg", "01_001_0005.jpg", "01_001_0010.jpg"]
    with Image.open(s1 / "train/good/01_001_0005.jpg") as im:
        assert im.size == (W, H) and abs(np.asarray(im).mean() - 50) < 6  # frame 5 is grey 50
    assert sorted(p.name for p in (s1 / "test/good").iterdir()) == [
        "01_0014_0000.jpg", "01_0014_0010.jpg"]
    assert (s1 / "test/anomaly/01_0014_0005.jpg").read_bytes() == \
        (raw / "testing/frames/01_0014/005.jpg").read_bytes()
    mask = np.asarray(Image.open(s1 / "ground_truth/anomaly/01_0014_0005_mask.png"))
    assert np.array_equal(mask, masks["01_0014"][5] * 255)
    marker = F.read_marker(root)
    assert marker["notes"]["dropped_classes"] == {"scene_03": "no training frames"}
    assert marker["key"]["conversion"]["protocol"] == "per_scene"


def test_mstc_frame_step_and_all_scenes(stc_raw, tmp_path):
    raw, _ = stc_raw
    notes = F.convert_mstc(raw, tmp_path, every=3, protocol="all_scenes")
    counts = F.count_layout(tmp_path)["all_scenes"]
    assert counts["train"] == 8  # frames 0, 3, 6, 9 of two videos
    assert counts["test"] == {"anomaly": 1, "good": 3 + 3 + 2}  # 01_0014: 0, 3, 6a, 9
    assert counts["masks"] == 1 and notes["dropped_classes"] == {}
    with pytest.raises(FetchError, match="protocol"):
        F.convert_mstc(raw, tmp_path / "x", protocol="per_video")


# ----------------------------------------------------------------------------------------------
# Hostile and damaged input


def test_a_damaged_install_is_an_error_that_says_how_to_repair(toy):
    from harness.errors import DatasetError
    from harness.manifest import check_installed

    root = toy.fetch()
    (root / "widget/test/crack/001.png").unlink()
    (root / "widget/train/good/000.png").write_bytes(_png(99))  # same size, other bytes
    with pytest.raises(FetchError, match=r"damaged \(2 problems\)[\s\S]*--force") as err:
        toy.fetch()
    assert "widget/test/crack/001.png: missing" in str(err.value)
    assert "widget/train/good/000.png: contents changed" in str(err.value)
    with pytest.raises(DatasetError, match="file list"):
        check_installed(root, ["widget"])  # what training checks first
    _assert_toy_installed(toy.fetch(force=True))


def test_a_second_fetch_of_the_same_dataset_is_refused_while_one_runs(toy):
    from filelock import FileLock

    toy.data.mkdir(parents=True)
    with FileLock(toy.data / ".toy.lock"):  # what a running fetch holds (an OS lock)
        with pytest.raises(FetchError, match="another fetch of toy is running"):
            toy.fetch()
    _assert_toy_installed(toy.fetch())  # released: the lock of a finished holder is free


def test_an_html_error_page_is_never_kept_as_the_archive(toy):
    toy.write_card(None)  # no pinned checksum, as MTD and the MVTec class archives
    toy.server.state.files["/upstream/toy.tar.gz"] = b"<html>quota exceeded</html>"
    toy.server.state.content_type["/upstream/toy.tar.gz"] = "text/html; charset=utf-8"
    with pytest.raises(FetchError, match="HTML page"):
        toy.fetch()
    toy.server.state.content_type.clear()  # the same page, sent as a binary
    with pytest.raises(FetchError, match="not usable and was deleted"):
        toy.fetch()
    assert not (toy.data / ".downloads/toy/toy.tar.gz").exists()


def test_an_unpinned_truncated_download_is_deleted_and_fetched_again(toy):
    toy.write_card(None)
    path = "/upstream/toy.tar.gz"
    toy.server.state.no_length.add(path)  # a close without Content-Length looks complete
    toy.server.state.drop_after[path] = len(toy.archive.read_bytes()) // 2
    with pytest.raises(FetchError, match="truncated or corrupt"):
        toy.fetch()
    assert not (toy.data / ".downloads/toy/toy.tar.gz").exists()
    _assert_toy_installed(toy.fetch())


def test_an_unpinned_download_is_reused_only_while_it_matches_its_recorded_hash(toy):
    toy.write_card(None)
    toy.fetch(keep_downloads=True)
    kept = toy.data / ".downloads/toy/toy.tar.gz"
    assert (kept.parent / "toy.tar.gz.sha256").read_text().strip() == toy.sha
    kept.write_bytes(kept.read_bytes()[:100])  # damaged later (a disk full, a partial copy)
    requests = len(toy.server.state.requests)
    _assert_toy_installed(toy.fetch(force=True, keep_downloads=True))
    assert len(toy.server.state.requests) == requests + 1  # downloaded again, not trusted


def test_a_partial_of_an_older_file_version_is_not_spliced_onto_the_new_one(server, tmp_path):
    old, new = PAYLOAD, PAYLOAD[::-1]
    server.state.files["/f.bin"] = old
    server.state.etags["/f.bin"] = '"v1"'
    server.state.drop_after["/f.bin"] = 50_000
    dest = tmp_path / "f.bin"
    with pytest.raises(FetchError, match="interrupted"):
        F.download(f"{server.base}/f.bin", dest, progress=False, retries=0)
    server.state.files["/f.bin"] = new  # changed upstream before the resume
    server.state.etags["/f.bin"] = '"v2"'
    F.download(f"{server.base}/f.bin", dest, progress=False, retries=0)
    assert dest.read_bytes() == new
    assert server.state.requests[-1] == ("/f.bin", "bytes=50000-")  # asked to resume, got it whole


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:xz"])
def test_a_truncated_tar_is_a_clear_error(tmp_path, mode):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, mode) as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"d/{i}.bin")
            info.size = 60_000
            tar.addfile(info, io.BytesIO(PAYLOAD[i * 60_000:(i + 1) * 60_000]))
    whole = archive.read_bytes()
    archive.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(FetchError, match="truncated or corrupt"):
        F.safe_extract(archive, tmp_path / "out")
    with pytest.raises(FetchError, match="truncated or corrupt"):
        fetch_unpack.check_archive(archive)


def test_archive_size_entry_and_ratio_limits(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(5_000_000))  # 5 MB of zeros: about 5 kB packed
    with pytest.raises(FetchError, match="decompression bomb"):
        F.safe_extract(bomb, tmp_path / "out")
    assert not (tmp_path / "out/zeros.bin").exists()
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tar:
        for i in range(5):
            info = tarfile.TarInfo(f"{i}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    monkeypatch.setattr(fetch_unpack, "MAX_ENTRIES", 4)
    with pytest.raises(FetchError, match="5 entries, over the limit of 4"):
        F.safe_extract(many, tmp_path / "out2")


def test_a_link_that_leaves_the_install_once_moved_into_place_is_refused(toy):
    # Inside the extraction folder when checked (toy_release/widget/... -> ../../../license.txt
    # stays in the extraction root), but two levels above the data root once widget/ is moved.
    with tarfile.open(toy.archive, "w:gz") as tar:
        for name, data in TOY_TREE.items():
            info = tarfile.TarInfo(f"toy_release/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("toy_release/widget/train/good/003.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../../outside.png"
        tar.addfile(link)
        outside = tarfile.TarInfo("outside.png")
        outside.size = len(_png(1))
        tar.addfile(outside, io.BytesIO(_png(1)))
    toy.write_card(None)
    toy.server.state.files["/upstream/toy.tar.gz"] = toy.archive.read_bytes()
    with pytest.raises(FetchError, match="outside the install"):
        toy.fetch()
    assert not (toy.data / "toy").exists()


def test_the_cards_are_found_from_outside_the_project(tmp_path, monkeypatch):
    from harness.fetch import cards

    monkeypatch.chdir(tmp_path)  # no pyproject.toml or dvc.yaml above: the cards beside the package
    assert cards.card_path("mtd") == Path(__file__).resolve().parents[1] / "datasets" / "mtd.yaml"
