"""Safe unpacking of tar and zip archives: every member is checked before anything is written.

Besides path and link attacks, an archive is refused when it would unpack to more than
``MAX_ENTRIES`` members, more than ``MAX_BYTES``, more than ``MAX_RATIO`` times its own size
(a decompression bomb) or more than the free space of the target disk. A truncated or corrupt
archive is a FetchError, never a traceback.
"""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from harness.errors import FetchError

MAX_ENTRIES = 2_000_000  # ShanghaiTech Campus, the largest card, has about 320,000
MAX_BYTES = 512 << 30
MAX_RATIO = 1000  # deflate tops out near 1032:1; real datasets of images stay far below
# What reading a damaged compressed stream raises, by compressor.
_STREAM_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)


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
    device files or fifos are refused with a FetchError naming the member, as are archives over
    the size limits above. Tar extraction also uses tarfile's "data" filter where Python has it.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, target)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, target)
        else:
            raise FetchError(f"{archive} is neither a tar nor a zip archive (truncated download?)")
    except FetchError:
        raise
    except _STREAM_ERRORS as exc:
        raise _damaged(archive, exc) from exc


def check_archive(archive: str | os.PathLike) -> None:
    """Read a whole archive without writing anything: FetchError when it is truncated, corrupt,
    or not an archive at all (an HTML error page saved under the archive's name, say)."""
    archive = Path(archive)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise FetchError(f"{archive}: member {bad!r} fails its CRC check; the archive "
                                     f"is corrupt. Delete it and download it again.")
            return
        if not tarfile.is_tarfile(archive):
            raise FetchError(f"{archive} is neither a tar nor a zip archive (an error page or a "
                             f"truncated download?). Delete it and download it again.")
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    handle = tar.extractfile(member)
                    while handle.read(1 << 20):
                        pass
    except FetchError:
        raise
    except _STREAM_ERRORS as exc:
        raise _damaged(archive, exc) from exc


def _damaged(archive: Path, exc: BaseException) -> FetchError:
    return FetchError(f"{archive} is truncated or corrupt ({type(exc).__name__}: {exc}); nothing "
                      f"was installed. Delete it and download it again (or pass a good copy "
                      f"with --source).")


def _check_sizes(archive: Path, target: Path, count: int, total: int) -> None:
    """Refuse archives over the entry, size and ratio limits, or too big for the target disk."""
    packed = max(archive.stat().st_size, 1)
    if count > MAX_ENTRIES:
        raise FetchError(f"{archive} holds {count} entries, over the limit of {MAX_ENTRIES}; "
                         f"refusing to extract (raise harness.fetch.unpack.MAX_ENTRIES if it is genuine)")
    if total > MAX_BYTES or total > MAX_RATIO * packed:
        raise FetchError(
            f"{archive} would unpack to {total} bytes from {packed} ({total / packed:.0f}x), over "
            f"the limits ({MAX_BYTES} bytes, {MAX_RATIO}x): a decompression bomb or a damaged "
            f"archive; refusing to extract")
    free = shutil.disk_usage(target).free
    if total > free:
        raise FetchError(f"{archive} unpacks to {total} bytes but {target} has {free} free; free "
                         f"some space or use another --data-root")


def _extract_tar(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        _check_sizes(archive, target, len(members), sum(m.size for m in members if m.isfile()))
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
        _check_sizes(archive, target, len(infos), sum(i.file_size for i in infos))
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
