"""fetch(): sources, one fetch per dataset at a time, and the atomic install.

An install is built in a hidden sibling folder (``.<name>.tmp-XXXX``) and renamed into place only
once conversion has finished. The marker ``.complete.json``, written last, is what makes a folder
count as installed: a crash leaves either the previous install or the new one, never a folder
that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from harness.errors import DatasetError, FetchError
from harness.fetch.cards import load_card
from harness.fetch.downloader import download_hashed, file_sha256, is_url, local_path
from harness.fetch.layout import (MARKER, check_counts, count_layout, format_summary, read_marker,
                                  write_marker)
from harness.fetch.messages import say
from harness.fetch.mstc import convert_mstc
from harness.fetch.mtd import convert_mtd
from harness.fetch.mvtec import convert_mvtec
from harness.fetch.unpack import check_archive, safe_extract
from harness.manifest import FILE_LIST, damage, write_file_list

MIRROR_ENV = "FLOWAD_MIRROR"
DOWNLOADS = ".downloads"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")


@dataclass(frozen=True)
class _Source:
    kind: str  # upstream | mirror_url | mirror_dir | archive_url | archive_file | extracted_dir
    location: str = ""


def _classify_source(source: str | os.PathLike | None, card: dict) -> _Source:
    if source is None:
        mirror = os.environ.get(MIRROR_ENV, "").strip()
        if not mirror:
            return _Source("upstream")
        if is_url(mirror) and not mirror.startswith("file://"):
            return _Source("mirror_url", mirror.rstrip("/"))
        folder = local_path(mirror)
        if not folder.is_dir():
            raise FetchError(f"{MIRROR_ENV}={mirror} is neither a URL nor an existing folder")
        return _Source("mirror_dir", str(folder))
    text = str(source)
    if text.startswith("file://"):
        text = str(local_path(text))
    if is_url(text):
        path = urllib.parse.urlparse(text).path.lower()
        if path.endswith(ARCHIVE_SUFFIXES):
            return _Source("archive_url", text)
        return _Source("mirror_url", text.rstrip("/"))
    path = Path(text).expanduser()
    if not path.exists():
        raise FetchError(f"source {path} does not exist")
    if path.is_file():
        return _Source("archive_file", str(path))
    archives = [e["filename"] for e in _all_entries(card) if e.get("extract", True)]
    if any((path / name).is_file() for name in archives):
        return _Source("mirror_dir", str(path))
    return _Source("extracted_dir", str(path))


def _all_entries(card: dict) -> list[dict]:
    return list(card["files"]) + list((card.get("class_files") or {}).values())


@dataclass
class _Obtained:
    path: Path
    sha256: str
    downloaded: bool


def _obtain(entry: dict, src: _Source, downloads: Path, card: dict, progress: bool) -> _Obtained:
    """A local, verified copy of one card file, from the source, a mirror or upstream."""
    is_archive = entry.get("extract", True)
    local: Path | None = None
    url: str | None = None
    if src.kind == "archive_file":
        sibling = Path(src.location).parent / entry["filename"]
        local = Path(src.location) if is_archive else (sibling if sibling.is_file() else None)
    elif src.kind == "archive_url":
        url = src.location if is_archive else None
    elif src.kind in ("mirror_dir", "extracted_dir"):
        candidate = Path(src.location) / entry["filename"]
        local = candidate if candidate.is_file() else None
    elif src.kind == "mirror_url":
        url = f"{src.location}/{entry['filename']}"
    if local is None and url is None:
        url = entry["url"]  # what the source does not hold comes from upstream
        if src.kind != "upstream":
            say(f"{entry['filename']} is not in {src.location}; using the upstream URL", progress)

    expected = entry.get("sha256")
    if local is not None:
        digest = file_sha256(local, progress)
        if expected and digest != expected:
            raise FetchError(
                f"checksum mismatch for {local}: expected sha256 {expected} (from "
                f"{card['_path']}), got {digest}. It is not the pinned file {entry['filename']}."
            )
        result = _Obtained(local, digest, downloaded=False)
    else:
        say(f"downloading {entry['filename']} from {url}", progress)
        path, digest = download_hashed(url, downloads / entry["filename"], expected, progress, retries=2,
                                       check=check_archive if is_archive else None)
        result = _Obtained(path, digest, downloaded=True)
    if not expected:
        say(f"sha256 of {entry['filename']}: {digest} (not pinned in {card['_path']}; add "
             f"`sha256: {digest}` to its entry to pin it)", progress)
    return result


@contextlib.contextmanager
def _exclusive(path: Path, name: str) -> Iterator[None]:
    """One fetch per dataset at a time: an OS lock (flock) on data_root/.<name>.lock, released by
    the kernel when its holder exits, however it exits. The file itself stays (deleting a lock
    file another process may be opening would break the exclusion)."""
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FetchError(f"another fetch of {name} is running ({path} is locked); wait for it to "
                         f"finish, then run the command again") from None
    try:
        yield
    finally:
        lock.release()


def _check_links_inside(build: Path) -> None:
    """Refuse a link that points outside the install once its class folder has moved into place
    (extraction checked it against the extraction folder, which held more than the install)."""
    root = os.path.realpath(build)
    for folder, dirs, files in os.walk(build):
        for name in dirs + files:
            path = Path(folder, name)
            if path.is_symlink():
                real = os.path.realpath(path)
                if not os.path.exists(path) or os.path.commonpath([real, root]) != root:
                    raise FetchError(
                        f"{path.relative_to(build)} in the converted data is a link to "
                        f"{os.readlink(path)!r}, outside the install (or broken); the source is "
                        f"unsafe or damaged, nothing was installed"
                    )


def check_install(target: Path, name: str) -> None:
    """FetchError when an install no longer matches the file list written at install."""
    try:
        problems = damage(target)
    except DatasetError as err:
        problems = [str(err)]
    if problems is None:
        problems = [f"{FILE_LIST} is missing (installed by an older version, or deleted)"]
    if problems:
        listed = "\n  - ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise FetchError(
            f"the install at {target} is damaged ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}):\n  - {listed}\nReinstall it with "
            f"`python -m harness fetch {name} --force` (add --source PATH if it came from a local copy)."
        )


def _tidy_leftovers(data_root: Path, name: str, progress: bool) -> None:
    """Undo what a crashed fetch left: restore an install moved aside, delete scratch folders."""
    target = data_root / name
    olds = sorted(data_root.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not target.exists():
        for old in reversed(olds):
            if read_marker(old) is not None:
                os.replace(old, target)
                say(f"restored the previous install of {name} from {old.name}", progress)
                break
    for pattern in (f".{name}.tmp-*", f".{name}.raw-*", f".{name}.old-*"):
        for leftover in data_root.glob(pattern):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(build: Path, target: Path) -> None:
    """Rename the finished build onto ``target``; an older install is moved aside, then deleted."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{int(time.time() * 1000)}")
        os.replace(target, old)
    os.replace(build, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _copy_class_tree(src: Path, dest: Path) -> None:
    """Carry an already installed class into a new build (hard links where possible)."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dest, copy_function=link_or_copy)


def fetch(
    name: str,
    data_root: str | os.PathLike = Path("datasets"),
    source: str | os.PathLike | None = None,
    force: bool = False,
    *,
    classes: Sequence[str] | None = None,
    cards_dir: str | os.PathLike | None = None,
    keep_downloads: bool = False,
    progress: bool = True,
) -> Path:
    """Install dataset ``name`` at ``data_root/name`` in the MVTec layout and return that path.

    An existing complete install (marker present, same card revision and conversion settings,
    covering ``classes``) is returned at once unless ``force``. ``source`` overrides where the
    files come from (see the module docstring). ``classes`` installs only some classes (MVTec AD:
    per-class archives, far smaller than the whole); classes already installed are kept.
    Downloads go to data_root/.downloads/<name>/ and are deleted after a successful install
    unless ``keep_downloads``; an interrupted download stays there and resumes on the next call.
    """
    card = load_card(name, cards_dir)
    data_root = Path(data_root)
    target = data_root / name
    fmt = card["format"]
    card_classes = list(card.get("classes") or [])
    if classes is not None:
        classes = list(dict.fromkeys(classes))
        unknown = [c for c in classes if card_classes and c not in card_classes]
        if unknown:
            raise FetchError(f"{', '.join(unknown)} not in the classes of {card['_path']}: "
                             f"{', '.join(card_classes)}")
    wanted = classes if classes is not None else (card_classes if fmt != "mstc" else None)
    partial = classes is not None and (fmt == "mstc" or set(classes) != set(card_classes))

    data_root.mkdir(parents=True, exist_ok=True)
    with _exclusive(data_root / f".{name}.lock", name):
        _tidy_leftovers(data_root, name, progress)
        marker = read_marker(target)
        compatible = marker is not None and marker.get("key") == _install_key(card)
        if compatible and not force:
            covered = (not marker.get("partial")) if wanted is None else \
                set(wanted) <= set(marker["classes"])
            if covered:
                say(f"{name} is already installed; checking its files", progress)
                check_install(target, name)
                say(f"{name} is already installed (pass force to reinstall)", progress)
                say(format_summary(marker, target), progress)
                return target
        if target.exists() and marker is None and not force:
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            else:
                raise FetchError(
                    f"{target} exists but holds no {MARKER}, so it is not a finished install "
                    f"(interrupted, or put there by hand). If it holds the extracted dataset, "
                    f"run `python -m harness fetch {name} --source <that folder> --force`; to "
                    f"replace it, add --force."
                )
        keep = []
        if compatible and not force and wanted is not None and marker.get("partial"):
            keep = sorted(set(marker["classes"]) - set(wanted))
        if marker is not None and not compatible:
            say(f"{target} was installed from another card revision or setting; reinstalling",
                 progress)

        downloads = data_root / DOWNLOADS / name
        build = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=data_root))
        os.chmod(build, 0o777 & ~umask())  # mkdtemp makes it private; the install should not be
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.raw-", dir=data_root))
        try:
            src = _classify_source(source, card)
            say(f"fetching {name} (revision {card['revision']}) from "
                 f"{src.location or 'the upstream URLs'}", progress)
            raw_root, obtained = _gather(card, src, wanted, partial, scratch, downloads, progress)
            notes = _convert(card, raw_root, build, wanted, obtained,
                             move=(raw_root != Path(src.location)), progress=progress)
            for cls in keep:
                _copy_class_tree(target / cls, build / cls)
            _check_links_inside(build)
            counts = count_layout(build)
            if wanted is not None:
                missing = [c for c in wanted if c not in counts]
                if missing:
                    raise FetchError(f"conversion produced no folder for {', '.join(missing)}")
            check_counts(card, counts)
            record = {
                "name": name,
                "revision": str(card["revision"]),
                "key": _install_key(card),
                "partial": partial and (set(counts) != set(card_classes) or fmt == "mstc"),
                "classes": counts,
                "files": {o.path.name: o.sha256 for o in obtained.values()},
                "source": src.location or "upstream",
                "notes": notes,
                "installed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            write_file_list(build)  # what later checks compare the install with
            write_marker(build, record)
            _swap_into_place(build, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
        if not keep_downloads:
            for item in obtained.values():
                if item.downloaded and item.path.parent == downloads:
                    item.path.unlink(missing_ok=True)
                    item.path.with_name(item.path.name + ".sha256").unlink(missing_ok=True)
            for folder in (downloads, downloads.parent):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    say(format_summary(record, target), progress)
    return target


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _gather(card: dict, src: _Source, wanted: Sequence[str] | None, partial: bool,
            scratch: Path, downloads: Path, progress: bool) -> tuple[Path, dict[str, _Obtained]]:
    """Obtain the card's files and extract its archives; returns (raw root, files by role)."""
    entries = list(card["files"])
    class_files = card.get("class_files") or {}
    if src.kind in ("archive_file", "archive_url"):
        # One archive given: check it against the card entry of the same file name (a per-class
        # archive, say), else against the main archive.
        given = Path(urllib.parse.urlparse(src.location).path).name
        same_name = [e for e in _all_entries(card) if e["filename"] == given]
        archive = same_name[0] if same_name else next(e for e in entries if e.get("extract", True))
        others = [e for e in entries if not e.get("extract", True)]
        entries = [dict(archive, role="archive"), *others]
    elif wanted and class_files and all(c in class_files for c in wanted) and (
            (partial and src.kind != "extracted_dir") or _holds_only_class_files(src, entries)):
        entries = [dict(class_files[c], role=f"class:{c}") for c in wanted] + \
            [e for e in entries if not e.get("extract", True)]
    obtained: dict[str, _Obtained] = {}
    raw_root = scratch / "extracted"
    for i, entry in enumerate(entries):
        role = entry.get("role", f"file{i}")
        is_archive = entry.get("extract", True)
        if is_archive and src.kind == "extracted_dir":
            continue  # the folder already holds the extracted contents
        item = _obtain(entry, src, downloads, card, progress)
        obtained[role] = item
        if is_archive:
            say(f"extracting {item.path.name}", progress)
            safe_extract(item.path, raw_root)
    if src.kind == "extracted_dir":
        raw_root = Path(src.location)
    return raw_root, obtained


def _holds_only_class_files(src: _Source, entries: list[dict]) -> bool:
    """A local mirror that has no whole-dataset archive, so per-class archives are used."""
    if src.kind != "mirror_dir":
        return False
    folder = Path(src.location)
    return not any((folder / e["filename"]).is_file() for e in entries if e.get("extract", True))


def _convert(card: dict, raw_root: Path, build: Path, wanted: Sequence[str] | None,
             obtained: dict[str, _Obtained], move: bool, progress: bool) -> dict:
    fmt = card["format"]
    settings = card.get("conversion") or {}
    say(f"converting to the MVTec layout in {build.name}", progress)
    if fmt == "mvtec":
        return convert_mvtec(raw_root, build, wanted, move=move)
    if fmt == "mtd":
        if "split" not in obtained:
            raise FetchError(f"{card['_path']} needs a `role: split` entry for the train list")
        return convert_mtd(raw_root, build, obtained["split"].path,
                           mask_threshold=int(settings.get("mask_threshold", 127)))
    return convert_mstc(
        raw_root, build, every=int(settings.get("frame_step", 5)),
        protocol=settings.get("protocol", "per_scene"), classes=wanted,
        jpeg_quality=int(settings.get("train_jpeg_quality", 95)), progress=progress,
    )


def _install_key(card: dict) -> dict:
    """What must match for an existing install to serve a request."""
    return {"name": card["name"], "format": card["format"], "revision": str(card["revision"]),
            "conversion": card.get("conversion") or {}}
