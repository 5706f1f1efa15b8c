"""Safe unpacking of tar and zip archives: every member is checked before anything is written."""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from harness.errors import FetchError


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
