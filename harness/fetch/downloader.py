"""Downloads: http(s), file:// or a local path, resumed with HTTP Range, checked against sha256.

Bytes stream into ``<dest>.part``; ``dest`` appears only once complete (and verified, when a
checksum is known).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from harness.errors import FetchError
from harness.fetch.messages import say

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_RETRY_PAUSE_S = 1.0
_USER_AGENT = "flowad-repro-fetch/0.1 (+python urllib)"
_OFFLINE_HINT = (
    "Without network access, download the file elsewhere and pass it with "
    "`python -m harness fetch <name> --source PATH`, or point FLOWAD_MIRROR at a mirror."
)


class _Interrupted(Exception):
    """The connection broke off mid-transfer; the .part file is kept so the next try resumes."""


def file_sha256(path: str | os.PathLike, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, progress_bar(size, 0, f"sha256 {path.name}", progress) as bar:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled, file=sys.stderr, leave=False,
    )


def local_path(url: str) -> Path | None:
    """The local file a url names (a plain path or file://), or None for a network URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if is_url(url):
        return None
    return Path(url).expanduser()


def download(
    url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True,
    retries: int = 2, check: Callable[[Path], None] | None = None,
) -> Path:
    """Fetch ``url`` (http(s), file:// or a local path) to ``dest`` and return ``dest``.

    Bytes stream into ``dest + ".part"``; an interrupted download resumes from there with an HTTP
    Range request made conditional on the partial's ETag or Last-Modified (If-Range), so a file
    that changed upstream is downloaded whole rather than spliced; a server that answers 200
    instead of 206 makes it start over. When ``sha256`` is given a mismatch deletes the download
    and raises FetchError naming both hashes. Without one, ``check`` (e.g. a full read of an
    archive) must accept the file. ``dest`` appears only once complete and verified, beside a
    ``.sha256`` file that later reuse is checked against.
    """
    return download_hashed(url, Path(dest), sha256, progress, retries, check)[0]


def download_hashed(
    url: str, dest: Path, sha256: str | None, progress: bool, retries: int,
    check: Callable[[Path], None] | None = None,
) -> tuple[Path, str]:
    """download(), also returning the file's sha256 (computed while streaming)."""
    expected = sha256.lower() if sha256 else None
    dest.parent.mkdir(parents=True, exist_ok=True)
    recorded = dest.with_name(dest.name + ".sha256")
    if dest.is_file():
        digest = file_sha256(dest, progress)
        known = expected or (recorded.read_text().strip() if recorded.is_file() else None)
        if digest == known:
            return dest, digest
        say(f"{dest} does not match its sha256 (or has none recorded); downloading it again", progress)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    local = local_path(url)
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
    if expected is None and check is not None:
        try:
            check(part)
        except FetchError as err:
            part.unlink(missing_ok=True)
            raise FetchError(f"the download of {dest.name} from {url} is not usable and was "
                             f"deleted: {err}") from None
    _validator_file(part).unlink(missing_ok=True)
    recorded.write_text(digest + "\n")
    os.replace(part, dest)
    return dest, digest


def _copy_hashing(src: Path, part: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(part, "wb") as fout, \
            progress_bar(src.stat().st_size, 0, src.name, progress) as bar:
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
            say(f"{exc}; resuming from byte {size} (retry {attempt} of {retries})", progress)
            time.sleep(_RETRY_PAUSE_S * attempt)


def _validator_file(part: Path) -> Path:
    """Where a partial download keeps its ETag (or Last-Modified), for If-Range on resume."""
    return part.with_name(part.name + ".etag")


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
    validator = _validator_file(part)
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator.is_file():  # resume only onto the same version of the file
            headers["If-Range"] = validator.read_text().strip()
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
        if response.headers.get_content_type() == "text/html":
            raise FetchError(
                f"{url} answered with an HTML page (HTTP {response.status}), not the file: an error "
                f"or login page. Check the URL in the dataset card, or use a mirror. {_OFFLINE_HINT}")
        tag = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if tag and response.status == 200:
            validator.write_text(tag)
        elif response.status == 200:
            validator.unlink(missing_ok=True)
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
                say(f"{url}: the server ignored the resume request (HTTP {response.status}); "
                     f"starting over", progress)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = offset
        name = part.name.removesuffix(".part")
        with open(part, mode) as out, progress_bar(total, offset, name, progress) as bar:
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


def is_url(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text) is not None
