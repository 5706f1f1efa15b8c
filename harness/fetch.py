"""Fetch a dataset named by its card and install it in the MVTec layout.

    datasets/<name>.yaml (card) -> download (resume, checksum) -> safe extraction -> converter
    -> <data_root>/<name>/<class>/train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png

An install is built in a hidden sibling folder (``.<name>.tmp-XXXX``) and renamed into place only
once conversion has finished. The marker ``.complete.json``, written last, is what makes a folder
count as installed: a crash leaves either the previous install or the new one, never a folder
that looks complete but is not.

Where the bytes come from, first match wins:
  1. ``source=`` (CLI ``--source``): an archive file, a folder holding the card's archives by file
     name (a local mirror), a folder already extracted, an archive URL, or a mirror base URL;
  2. the environment variable FLOWAD_MIRROR (a mirror base URL or folder);
  3. the upstream URLs in the card.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from harness.errors import FetchError

MIRROR_ENV = "FLOWAD_MIRROR"
MARKER = ".complete.json"
DOWNLOADS = ".downloads"
CARD_FORMATS = ("mvtec", "mtd", "mstc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_RETRY_PAUSE_S = 1.0
_USER_AGENT = "flowad-repro-fetch/0.1 (+python urllib)"
_OFFLINE_HINT = (
    "Without network access, download the file elsewhere and pass it with "
    "`python -m harness fetch <name> --source PATH`, or point FLOWAD_MIRROR at a mirror."
)


def _say(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Dataset cards


def find_project_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: cwd) with pyproject.toml or dvc.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() or (folder / "dvc.yaml").is_file():
            return folder
    return None


def _cards_dirs(cards_dir: str | os.PathLike | None) -> list[Path]:
    if cards_dir is not None:
        return [Path(cards_dir)]
    found = []
    root = find_project_root()
    if root is not None:
        found.append(root / "datasets")
    # Fall back to the cards next to this package (running from outside the project folder).
    found.append(Path(__file__).resolve().parent.parent / "datasets")
    return found


def card_path(name: str, cards_dir: str | os.PathLike | None = None) -> Path:
    """Where the card for ``name`` lives; FetchError listing the known cards if there is none."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise FetchError(f"dataset name {name!r} is not valid: use a datasets/*.yaml card's stem")
    searched = _cards_dirs(cards_dir)
    for folder in searched:
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    known = sorted({p.stem for d in searched if d.is_dir() for p in d.glob("*.yaml")})
    raise FetchError(
        f"no dataset card {name}.yaml in {', '.join(str(f) for f in searched)}. "
        f"Known cards: {', '.join(known) or 'none'}. Run from the project folder or pass cards_dir."
    )


def load_card(name: str, cards_dir: str | os.PathLike | None = None) -> dict:
    """Read and check datasets/<name>.yaml; the card's own path is kept under ``_path``."""
    path = card_path(name, cards_dir)
    try:
        card = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FetchError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(card, dict):
        raise FetchError(f"{path} must hold a mapping (name, format, revision, files, ...)")

    def bad(what: str) -> FetchError:
        return FetchError(f"{path}: {what}")

    for key in ("name", "format", "revision", "files"):
        if key not in card:
            raise bad(f"missing required field `{key}`")
    if card["name"] != name:
        raise bad(f"`name: {card['name']}` does not match the file name ({name})")
    if card["format"] not in CARD_FORMATS:
        raise bad(f"`format: {card['format']}` is not one of {', '.join(CARD_FORMATS)}")
    if card["format"] != "mstc" and not card.get("classes"):
        raise bad("`classes` must list the dataset's classes")
    entries = list(card["files"]) + list((card.get("class_files") or {}).values())
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("filename") or not entry.get("url"):
            raise bad(f"every entry of `files`/`class_files` needs filename and url: {entry!r}")
        if Path(entry["filename"]).name != entry["filename"]:
            raise bad(f"filename {entry['filename']!r} must be a bare file name")
        digest = entry.get("sha256")
        if digest is not None and not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise bad(f"sha256 of {entry['filename']} must be 64 lower-case hex digits or null")
    card["_path"] = str(path)
    return card


# ----------------------------------------------------------------------------------------------
# Downloads


class _Interrupted(Exception):
    """The connection broke off mid-transfer; the .part file is kept so the next try resumes."""


def file_sha256(path: str | os.PathLike, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, _bar(size, 0, f"sha256 {path.name}", progress) as bar:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled, file=sys.stderr, leave=False,
    )


def _local_path(url: str) -> Path | None:
    """The local file a url names (a plain path or file://), or None for a network URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if _is_url(url):
        return None
    return Path(url).expanduser()


def download(
    url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True,
    retries: int = 2,
) -> Path:
    """Fetch ``url`` (http(s), file:// or a local path) to ``dest`` and return ``dest``.

    Bytes stream into ``dest + ".part"``; an interrupted download resumes from there with an HTTP
    Range request (a server that answers 200 instead of 206 makes it start over). When ``sha256``
    is given a mismatch deletes the download and raises FetchError naming both hashes. ``dest``
    appears only once complete and verified.
    """
    return _download(url, Path(dest), sha256, progress, retries)[0]


def _download(
    url: str, dest: Path, sha256: str | None, progress: bool, retries: int
) -> tuple[Path, str]:
    """download(), also returning the file's sha256 (computed while streaming)."""
    expected = sha256.lower() if sha256 else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        digest = file_sha256(dest, progress)
        if expected is None or digest == expected:
            return dest, digest
        _say(f"{dest} does not match its sha256; downloading it again", progress)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise FetchError(f"{local} does not exist or is not a file (given as {url})")
        digest = _copy_hashing(local, part, progress)
    else:
        digest = _http_download(url, part, progress, retries)
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"checksum mismatch for {dest.name} (from {url}): expected sha256 {expected}, "
            f"got {digest}. The bad download was deleted. If the file changed upstream on "
            f"purpose, update sha256 in the dataset card; otherwise try again or use a mirror."
        )
    os.replace(part, dest)
    return dest, digest


def _copy_hashing(src: Path, part: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(part, "wb") as fout, \
            _bar(src.stat().st_size, 0, src.name, progress) as bar:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            fout.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _http_download(url: str, part: Path, progress: bool, retries: int) -> str:
    attempt = 0
    while True:
        try:
            return _http_attempt(url, part, progress)
        except _Interrupted as exc:
            attempt += 1
            size = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise FetchError(
                    f"download of {url} was interrupted ({exc}); {size} bytes are kept in {part}. "
                    f"Run the same command again to resume."
                ) from exc
            _say(f"{exc}; resuming from byte {size} (retry {attempt} of {retries})", progress)
            time.sleep(_RETRY_PAUSE_S * attempt)


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) from 'bytes 100-199/200' or 'bytes */200'."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", header or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _http_attempt(url: str, part: Path, progress: bool) -> str:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise _Interrupted(f"HTTP {exc.code} ({exc.reason}) from the server") from exc
        if exc.code == 416 and offset:
            # Range not satisfiable: either the .part already holds the whole file or it is junk.
            if _content_range(exc.headers.get("Content-Range"))[1] == offset:
                return file_sha256(part)
            part.unlink()
            raise _Interrupted("the server refused to resume (HTTP 416); starting over") from exc
        raise FetchError(f"HTTP {exc.code} ({exc.reason}) for {url}. {_OFFLINE_HINT}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (TimeoutError, socket.timeout)):
            raise _Interrupted(f"no answer from {url} within {_TIMEOUT_S:.0f} s") from exc
        raise FetchError(f"cannot reach {url}: {exc.reason}. {_OFFLINE_HINT}") from exc
    except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        raise _Interrupted(f"the connection to {url} broke: {exc!r}") from exc

    digest = hashlib.sha256()
    with response:
        if offset and response.status == 206:
            start, _ = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Interrupted(f"the server resumed at byte {start}, not {offset}; "
                                   f"starting over")
            with open(part, "rb") as f:  # the hash must cover the bytes already on disk
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    digest.update(chunk)
            mode = "ab"
        else:
            if offset:
                _say(f"{url}: the server ignored the resume request (HTTP {response.status}); "
                     f"starting over", progress)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = offset
        name = part.name.removesuffix(".part")
        with open(part, mode) as out, _bar(total, offset, name, progress) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (http.client.HTTPException, OSError) as exc:
                    raise _Interrupted(f"connection lost after {received} bytes: {exc!r}") from exc
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Safe extraction


def _member_parts(name: str, archive: Path) -> list[str]:
    """Path components of an archive member, refusing absolute paths and `..` components."""
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or PureWindowsPath(name).drive or name.startswith("\\")):
        raise FetchError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"{archive}: member {name!r} contains '..'; refusing to extract")
    return parts


def _check_no_link_on_path(parts: list[str], links: set[str], name: str, archive: Path) -> None:
    """Refuse a member whose folder path runs through a symlink from the same archive."""
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise FetchError(
                f"{archive}: member {name!r} is written through the symlink "
                f"{'/'.join(parts[:i])!r}; refusing to extract"
            )


def _check_link_target(parts: list[str], target: str, links: set[str], name: str,
                       archive: Path, hard: bool) -> None:
    """Refuse a link whose target is absolute, leaves the extraction folder or runs through a
    symlink (a lexical check is exact only when no intermediate component is a symlink)."""
    kind = "hard link" if hard else "symlink"
    if (PurePosixPath(target).is_absolute() or PureWindowsPath(target).is_absolute()
            or PureWindowsPath(target).drive):
        raise FetchError(f"{archive}: {kind} {name!r} points to the absolute path {target!r}; "
                         f"refusing to extract")
    resolved = [] if hard else parts[:-1]
    steps = [p for p in target.replace("\\", "/").split("/") if p not in ("", ".")]
    for i, step in enumerate(steps):
        if step == "..":
            if not resolved:
                raise FetchError(f"{archive}: {kind} {name!r} -> {target!r} points outside the "
                                 f"extraction folder; refusing to extract")
            resolved.pop()
        else:
            resolved.append(step)
            if i < len(steps) - 1 and "/".join(resolved) in links:
                raise FetchError(f"{archive}: {kind} {name!r} -> {target!r} runs through another "
                                 f"symlink; refusing to extract")


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> None:
    """Extract a tar (plain, gz, xz, bz2) or zip archive into ``target``.

    Every member is checked before anything is written: absolute paths, `..` components, links
    that leave ``target`` or run through other links, members written through a symlink, and
    device files or fifos are refused with a FetchError naming the member. Tar extraction also
    uses tarfile's "data" filter where Python has it.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, target)
    else:
        raise FetchError(f"{archive} is neither a tar nor a zip archive (truncated download?)")


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        links = {"/".join(_member_parts(m.name, archive)) for m in members if m.issym()}
        for m in members:
            parts = _member_parts(m.name, archive)
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                kind = "device file" if m.isdev() else "special file"
                raise FetchError(f"{archive}: member {m.name!r} is a {kind}; refusing to extract")
            _check_no_link_on_path(parts, links, m.name, archive)
            if m.issym() or m.islnk():
                _check_link_target(parts, m.linkname, links, m.name, archive, hard=m.islnk())
        try:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(target, members=members, filter="data")
            else:  # Python without extraction filters: the checks above are the guard
                tar.extractall(target, members=members)
        except tarfile.TarError as exc:  # FilterError and friends
            member = getattr(exc, "tarinfo", None)
            name = member.name if member is not None else "?"
            raise FetchError(f"{archive}: member {name!r} refused by tarfile: {exc}") from exc


def _extract_zip(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        is_link = {i.filename: stat.S_ISLNK(i.external_attr >> 16) for i in infos}
        links = {"/".join(_member_parts(i.filename, archive)) for i in infos if is_link[i.filename]}
        link_targets: dict[str, str] = {}
        for info in infos:
            parts = _member_parts(info.filename, archive)
            # Unix file type bits; 0 when the writer set none (zipfile itself, DOS tools).
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if file_type not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                raise FetchError(f"{archive}: member {info.filename!r} is a special file; "
                                 f"refusing to extract")
            _check_no_link_on_path(parts, links, info.filename, archive)
            if is_link[info.filename]:
                link = zf.read(info).decode("utf-8")
                _check_link_target(parts, link, links, info.filename, archive, hard=False)
                link_targets["/".join(parts)] = link
        for info in infos:
            if not is_link[info.filename]:
                zf.extract(info, target)
        # zipfile writes symlinks as text files; create them last, so nothing is written via one.
        for rel, link in link_targets.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link, path)


# ----------------------------------------------------------------------------------------------
# Converters to the MVTec layout


def _find_dir(root: Path, accept, max_depth: int = 3) -> Path | None:
    """Breadth-first search for the first folder under ``root`` (itself included) ``accept``s."""
    level = [root]
    for _ in range(max_depth + 1):
        for folder in level:
            if accept(folder):
                return folder
        level = [
            d for folder in level for d in sorted(folder.iterdir())
            if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"
        ]
    return None


def _write_mask(mask: np.ndarray, path: Path) -> None:
    """A binary mask as an 8-bit PNG with values 0 and 255."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def convert_mvtec(raw_root: str | os.PathLike, out_root: str | os.PathLike,
                  classes: Sequence[str], move: bool = False) -> dict:
    """Put MVTec-layout class folders found under ``raw_root`` into ``out_root``.

    ``move`` renames instead of copying (for folders fetch extracted itself). The publisher's
    licence and readme files at the top level come along.
    """
    raw_root, out_root = Path(raw_root), Path(out_root)
    root = _find_dir(raw_root, lambda d: any((d / c / "train").is_dir() for c in classes))
    if root is None:
        raise FetchError(f"no class folder ({', '.join(classes)}) with a train/ folder under "
                         f"{raw_root}: is this the right archive or folder?")
    for name in classes:
        src = root / name
        if not (src / "train" / "good").is_dir() or not (src / "test").is_dir():
            raise FetchError(f"{src} is missing or lacks train/good and test/: the source does "
                             f"not hold class {name!r} in the MVTec layout")
    out_root.mkdir(parents=True, exist_ok=True)
    for name in classes:
        if move:
            os.replace(root / name, out_root / name)
        else:
            shutil.copytree(root / name, out_root / name)
    for extra in root.iterdir():
        if extra.is_file() and extra.suffix.lower() in (".txt", ".md"):
            shutil.copyfile(extra, out_root / extra.name)
    return {}


MTD_CLASS = "magnetic_tile"
MTD_DEFECT_FOLDERS = {
    "MT_Blowhole": "blowhole", "MT_Break": "break", "MT_Crack": "crack",
    "MT_Fray": "fray", "MT_Uneven": "uneven",
}


def _read_split(train_list: str | os.PathLike | Iterable[str]) -> tuple[list[str], str]:
    if isinstance(train_list, (str, os.PathLike)):
        path = Path(train_list)
        if not path.is_file():
            raise FetchError(f"MTD split file {path} does not exist")
        return [n.strip() for n in path.read_text().splitlines() if n.strip()], str(path)
    return [str(n).strip() for n in train_list if str(n).strip()], "the given train list"


def convert_mtd(raw_root: str | os.PathLike, out_root: str | os.PathLike,
                train_list: str | os.PathLike | Iterable[str], mask_threshold: int = 127) -> dict:
    """MTD (MT_*/Imgs/<name>.jpg + same-name .png masks) -> one MVTec-layout class.

    train/good: the MT_Free images named in ``train_list`` (DifferNet's split); test/good: the
    other MT_Free images; test/<defect>: every defective image, with its mask thresholded
    (> ``mask_threshold`` is defect; the published PNGs hold a few grey values) and written as
    0/255 PNG. Image bytes are copied unchanged (no JPEG re-encoding).
    """
    raw_root, out_root = Path(raw_root), Path(out_root)
    root = _find_dir(raw_root, lambda d: (d / "MT_Free" / "Imgs").is_dir())
    if root is None:
        raise FetchError(f"no MT_Free/Imgs folder under {raw_root}: not the MTD repository?")
    names, split_source = _read_split(train_list)
    free = sorted(p.name for p in (root / "MT_Free" / "Imgs").glob("*.jpg"))
    duplicates = sorted(n for n, k in Counter(names).items() if k > 1)
    if duplicates:
        raise FetchError(f"{split_source} lists {len(duplicates)} names twice, "
                         f"e.g. {', '.join(duplicates[:3])}")
    missing = sorted(set(names) - set(free))
    if missing:
        raise FetchError(
            f"{len(missing)} names in {split_source} are not in {root / 'MT_Free' / 'Imgs'}, e.g. "
            f"{', '.join(missing[:5])}. The split must match the pinned MTD revision."
        )
    train = set(names)
    cls = out_root / MTD_CLASS
    for sub in ("train/good", "test/good"):
        (cls / sub).mkdir(parents=True, exist_ok=True)
    for name in free:
        dest = cls / ("train/good" if name in train else "test/good") / name
        shutil.copyfile(root / "MT_Free" / "Imgs" / name, dest)

    for folder, defect in MTD_DEFECT_FOLDERS.items():
        images = sorted((root / folder / "Imgs").glob("*.jpg"))
        if not images:
            raise FetchError(f"{root / folder / 'Imgs'} holds no .jpg images")
        (cls / "test" / defect).mkdir(parents=True, exist_ok=True)
        (cls / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for image in images:
            mask_path = image.with_suffix(".png")
            if not mask_path.is_file():
                raise FetchError(f"{image} has no mask {mask_path.name} next to it")
            with Image.open(image) as im:
                size = im.size
            with Image.open(mask_path) as mk:
                mask = np.asarray(mk.convert("L")) > mask_threshold
            if mask.shape != (size[1], size[0]):
                raise FetchError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its "
                                 f"image is {size[0]}x{size[1]}")
            shutil.copyfile(image, cls / "test" / defect / image.name)
            _write_mask(mask, cls / "ground_truth" / defect / f"{image.stem}_mask.png")
    return {"train_list_entries": len(names)}


MSTC_PROTOCOLS = ("per_scene", "all_scenes")


def _mstc_class(video_id: str, protocol: str) -> str:
    # Video ids are <scene>_<number>: "01_001" (training) or "01_0014" (test) -> scene_01.
    return f"scene_{video_id.split('_')[0]}" if protocol == "per_scene" else "all_scenes"


def _numeric_order(path: Path) -> tuple:
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def convert_mstc(
    raw_root: str | os.PathLike, out_root: str | os.PathLike, every: int = 5,
    protocol: str = "per_scene", classes: Sequence[str] | None = None, jpeg_quality: int = 95,
    progress: bool = False,
) -> dict:
    """ShanghaiTech Campus -> mSTC in the MVTec layout.

    Every ``every``-th frame of each training video (decoded with PyAV, saved as JPEG) goes to
    train/good, and every ``every``-th test frame (JPEG bytes copied) to test/good or, when its
    pixel mask has any anomalous pixel, to test/anomaly with a 0/255 mask. ``protocol``
    "per_scene" makes one class per scene (scene_01, ...); "all_scenes" one class for all.
    Classes left without training or test frames are dropped and listed in the result.
    """
    import av  # imported here: only mSTC needs a video decoder

    if protocol not in MSTC_PROTOCOLS:
        raise FetchError(f"mSTC protocol {protocol!r} is not one of {', '.join(MSTC_PROTOCOLS)}")
    if every < 1:
        raise FetchError(f"mSTC frame step must be >= 1, got {every}")
    raw_root, out_root = Path(raw_root), Path(out_root)
    root = _find_dir(raw_root, lambda d: (d / "training").is_dir() and (d / "testing").is_dir())
    if root is None:
        raise FetchError(f"no training/ and testing/ folders under {raw_root}: not ShanghaiTech?")
    wanted = set(classes) if classes is not None else None

    videos = sorted((root / "training" / "videos").glob("*.avi"))
    if not videos:
        raise FetchError(f"no training videos in {root / 'training' / 'videos'}")
    for video in tqdm(videos, desc="mSTC training videos", disable=not progress, file=sys.stderr):
        cls = _mstc_class(video.stem, protocol)
        if wanted is not None and cls not in wanted:
            continue
        out = out_root / cls / "train" / "good"
        out.mkdir(parents=True, exist_ok=True)
        try:
            with av.open(str(video)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for index, frame in enumerate(container.decode(stream)):
                    if index % every == 0:
                        frame.to_image().save(out / f"{video.stem}_{index:04d}.jpg",
                                              quality=jpeg_quality)
        except av.error.FFmpegError as exc:
            raise FetchError(f"cannot decode {video}: {exc}") from exc

    frames_root = root / "testing" / "frames"
    test_videos = sorted(_subfolders(frames_root))
    if not test_videos:
        raise FetchError(f"no test frame folders in {frames_root}")
    label_disagreements = 0
    for video in tqdm(test_videos, desc="mSTC test videos", disable=not progress, file=sys.stderr):
        cls = _mstc_class(video.name, protocol)
        if wanted is not None and cls not in wanted:
            continue
        frames = sorted(video.glob("*.jpg"), key=_numeric_order)
        pixel_path = root / "testing" / "test_pixel_mask" / f"{video.name}.npy"
        label_path = root / "testing" / "test_frame_mask" / f"{video.name}.npy"
        if not pixel_path.is_file():
            raise FetchError(f"{video} has no pixel mask {pixel_path}")
        try:
            pixel_masks = np.load(pixel_path, mmap_mode="r")  # [frames, H, W]; read frame by frame
            labels = np.load(label_path) if label_path.is_file() else None
        except (OSError, ValueError) as exc:
            raise FetchError(f"cannot read the masks of {video.name}: {exc}") from exc
        if pixel_masks.ndim != 3 or len(pixel_masks) != len(frames):
            raise FetchError(f"{pixel_path} has shape {pixel_masks.shape}, expected "
                             f"[{len(frames)} frames, H, W] to match {video}")
        for index in range(0, len(frames), every):
            frame = frames[index]
            mask = np.asarray(pixel_masks[index]) > 0
            with Image.open(frame) as im:
                width, height = im.size
            if mask.shape != (height, width):
                raise FetchError(f"{pixel_path}[{index}] is {mask.shape[1]}x{mask.shape[0]} but "
                                 f"{frame} is {width}x{height}")
            anomalous = bool(mask.any())
            if labels is not None and bool(labels[index]) != anomalous:
                label_disagreements += 1  # pixel masks decide, as the pixel metric does
            stem = f"{video.name}_{index:04d}"
            defect = "anomaly" if anomalous else "good"
            (out_root / cls / "test" / defect).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(frame, out_root / cls / "test" / defect / f"{stem}{frame.suffix}")
            if anomalous:
                gt = out_root / cls / "ground_truth" / "anomaly"
                gt.mkdir(parents=True, exist_ok=True)
                _write_mask(mask, gt / f"{stem}_mask.png")

    dropped = {}
    for cls_dir in sorted(d for d in out_root.iterdir() if d.is_dir()):
        has_train = _count_images(cls_dir / "train" / "good") > 0
        has_test = (cls_dir / "test").is_dir()
        if not (has_train and has_test):
            dropped[cls_dir.name] = "no test frames" if has_train else "no training frames"
            shutil.rmtree(cls_dir)
    return {"dropped_classes": dropped, "frame_label_disagreements": label_disagreements}


# ----------------------------------------------------------------------------------------------
# Counting, marker, summary


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []


def _count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir()
               if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def count_layout(root: str | os.PathLike) -> dict[str, dict]:
    """Per class: train, test_good, test_defective, masks and the per-folder test counts."""
    counts = {}
    root = Path(root)
    for cls in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        test = {d.name: _count_images(d) for d in _subfolders(cls / "test")}
        gt = cls / "ground_truth"
        masks = sum(_count_images(d) for d in _subfolders(gt))
        counts[cls.name] = {
            "train": _count_images(cls / "train" / "good"),
            "test_good": test.get("good", 0),
            "test_defective": sum(n for d, n in test.items() if d != "good"),
            "masks": masks,
            "test": test,
        }
    return counts


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The install record of a dataset folder, or None when the folder is not a complete install."""
    path = Path(folder) / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "classes" in marker else None


def _install_key(card: dict) -> dict:
    """What must match for an existing install to serve a request."""
    return {"name": card["name"], "format": card["format"], "revision": str(card["revision"]),
            "conversion": card.get("conversion") or {}}


def format_summary(marker: dict, path: str | os.PathLike | None = None) -> str:
    """A short table of per-class counts, for the command line."""
    rows = [("class", "train", "test good", "test defective", "masks")]
    total = [0, 0, 0, 0]
    for cls, c in sorted(marker["classes"].items()):
        values = [c["train"], c["test_good"], c["test_defective"], c["masks"]]
        rows.append((cls, *map(str, values)))
        total = [a + b for a, b in zip(total, values, strict=True)]
    if len(marker["classes"]) > 1:
        rows.append(("total", *map(str, total)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"{marker['name']} (revision {str(marker['revision'])[:12]})"
             + (f" at {path}" if path else "")]
    for r in rows:
        lines.append("  " + r[0].ljust(widths[0]) + "".join(
            "  " + v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)))
    for cls, why in sorted((marker.get("notes") or {}).get("dropped_classes", {}).items()):
        lines.append(f"  ({cls} left out: {why})")
    return "\n".join(lines)


def _check_counts(card: dict, counts: dict[str, dict]) -> None:
    expected = card.get("expected_counts") or {}
    problems = []
    for cls, got in counts.items():
        for key, want in (expected.get(cls) or {}).items():
            if got.get(key) != want:
                problems.append(f"{cls} {key}: expected {want}, got {got.get(key)}")
    if problems:
        raise FetchError(
            f"the converted data does not match {card['_path']}: {'; '.join(problems[:6])}. "
            f"The source is not the pinned revision {card['revision']} (or is damaged); nothing "
            f"was installed."
        )


# ----------------------------------------------------------------------------------------------
# fetch: sources, locking, atomic install


@dataclass(frozen=True)
class _Source:
    kind: str  # upstream | mirror_url | mirror_dir | archive_url | archive_file | extracted_dir
    location: str = ""


def _is_url(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text) is not None


def _classify_source(source: str | os.PathLike | None, card: dict) -> _Source:
    if source is None:
        mirror = os.environ.get(MIRROR_ENV, "").strip()
        if not mirror:
            return _Source("upstream")
        if _is_url(mirror) and not mirror.startswith("file://"):
            return _Source("mirror_url", mirror.rstrip("/"))
        folder = _local_path(mirror)
        if not folder.is_dir():
            raise FetchError(f"{MIRROR_ENV}={mirror} is neither a URL nor an existing folder")
        return _Source("mirror_dir", str(folder))
    text = str(source)
    if text.startswith("file://"):
        text = str(_local_path(text))
    if _is_url(text):
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
            _say(f"{entry['filename']} is not in {src.location}; using the upstream URL", progress)

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
        _say(f"downloading {entry['filename']} from {url}", progress)
        path, digest = _download(url, downloads / entry["filename"], expected, progress, retries=2)
        result = _Obtained(path, digest, downloaded=True)
    if not expected:
        _say(f"sha256 of {entry['filename']}: {digest} (not pinned in {card['_path']}; add "
             f"`sha256: {digest}` to its entry to pin it)", progress)
    return result


class _Lock:
    """data_root/.<name>.lock holding the owner's pid: one fetch per dataset at a time."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> _Lock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._owner_alive():
                    raise FetchError(
                        f"another fetch is running ({self.path} names a live process); wait for "
                        f"it, or delete the lock file if that process is not a fetch"
                    ) from None
                self.path.unlink(missing_ok=True)  # left by a process that died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise FetchError(f"cannot take the lock {self.path}")

    def _owner_alive(self) -> bool:
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return False
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _tidy_leftovers(data_root: Path, name: str, progress: bool) -> None:
    """Undo what a crashed fetch left: restore an install moved aside, delete scratch folders."""
    target = data_root / name
    olds = sorted(data_root.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not target.exists():
        for old in reversed(olds):
            if read_marker(old) is not None:
                os.replace(old, target)
                _say(f"restored the previous install of {name} from {old.name}", progress)
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
    with _Lock(data_root / f".{name}.lock"):
        _tidy_leftovers(data_root, name, progress)
        marker = read_marker(target)
        compatible = marker is not None and marker.get("key") == _install_key(card)
        if compatible and not force:
            covered = (not marker.get("partial")) if wanted is None else \
                set(wanted) <= set(marker["classes"])
            if covered:
                _say(f"{name} is already installed (pass force to reinstall)", progress)
                _say(format_summary(marker, target), progress)
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
            _say(f"{target} was installed from another card revision or setting; reinstalling",
                 progress)

        downloads = data_root / DOWNLOADS / name
        build = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=data_root))
        os.chmod(build, 0o777 & ~_umask())  # mkdtemp makes it private; the install should not be
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.raw-", dir=data_root))
        try:
            src = _classify_source(source, card)
            _say(f"fetching {name} (revision {card['revision']}) from "
                 f"{src.location or 'the upstream URLs'}", progress)
            raw_root, obtained = _gather(card, src, wanted, partial, scratch, downloads, progress)
            notes = _convert(card, raw_root, build, wanted, obtained,
                             move=(raw_root != Path(src.location)), progress=progress)
            for cls in keep:
                _copy_class_tree(target / cls, build / cls)
            counts = count_layout(build)
            if wanted is not None:
                missing = [c for c in wanted if c not in counts]
                if missing:
                    raise FetchError(f"conversion produced no folder for {', '.join(missing)}")
            _check_counts(card, counts)
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
            _write_marker(build, record)
            _swap_into_place(build, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if build.exists():
                shutil.rmtree(build, ignore_errors=True)
        if not keep_downloads:
            for item in obtained.values():
                if item.downloaded and item.path.parent == downloads:
                    item.path.unlink(missing_ok=True)
            for folder in (downloads, downloads.parent):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    _say(format_summary(record, target), progress)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_marker(build: Path, record: dict) -> None:
    with open(build / MARKER, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


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
            _say(f"extracting {item.path.name}", progress)
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
    _say(f"converting to the MVTec layout in {build.name}", progress)
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
