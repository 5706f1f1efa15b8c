"""The file list of an installed dataset: every file's size and sha256, written at install.

``fetch`` and ``generate`` write ``<dataset>/.files.json`` before they mark an install complete;
``prepare`` / ``fetch`` check the whole install against it and training checks its class, so a
deleted, truncated, replaced or added file is an error that says how to repair the install,
rather than a run on damaged data. A folder without the list (a user's own data) is not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from harness.errors import DatasetError

FILE_LIST = ".files.json"
FORMAT = "flowad-files/1"
_CHUNK = 1 << 20
_LISTED = 8


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _visible_files(root: Path, prefixes: Sequence[str] | None = None) -> list[str]:
    """Relative paths of the regular files under ``root`` (names starting with a dot skipped, as
    the reader skips them), optionally only under the given top-level folders."""
    found = []
    tops = [root / p for p in prefixes] if prefixes is not None else [root]
    for top in tops:
        if not top.is_dir():
            continue
        for folder, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)


def write_file_list(root: str | os.PathLike) -> Path:
    """Record every visible file of ``root`` (size and sha256) in ``root/.files.json``."""
    root = Path(root)
    files = {}
    for relative in _visible_files(root):
        path = root / relative
        files[relative] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    target = root / FILE_LIST
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, target)
    return target


def read_file_list(root: str | os.PathLike) -> dict[str, dict] | None:
    """The recorded files of an install, or None when it has no list."""
    path = Path(root) / FILE_LIST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path} is unreadable ({err}): the install is damaged") from None
    return files


def damage(root: str | os.PathLike, classes: Sequence[str] | None = None,
           hashes: bool = True) -> list[str] | None:
    """What differs between ``root`` and its file list (within ``classes`` if given): missing,
    changed and unexpected files, each as a short line. None when ``root`` has no list."""
    root = Path(root)
    recorded = read_file_list(root)
    if recorded is None:
        return None
    if classes is not None:
        recorded = {k: v for k, v in recorded.items() if k.split("/", 1)[0] in classes}
    present = set(_visible_files(root, classes))
    problems = [f"{k}: missing" for k in sorted(set(recorded) - present)]
    problems += [f"{k}: not part of the install" for k in sorted(present - set(recorded))]
    for relative in sorted(present & set(recorded)):
        path, want = root / relative, recorded[relative]
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{relative}: not a regular file")
        elif info.st_size != want["size"]:
            problems.append(f"{relative}: {info.st_size} bytes, installed with {want['size']}")
        elif hashes and file_sha256(path) != want["sha256"]:
            problems.append(f"{relative}: contents changed since install")
    return problems


def check_installed(root: str | os.PathLike, classes: Sequence[str] | None = None,
                    repair: str = "") -> None:
    """DatasetError listing the damage (see ``damage``), ending with how to repair it."""
    problems = damage(root, classes)
    if not problems:
        return
    shown = "\n  - ".join(problems[:_LISTED])
    more = f"\n  ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
    raise DatasetError(
        f"{root} does not match the file list written when it was installed "
        f"({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n  - {shown}{more}\n"
        f"{repair or 'Reinstall the dataset (fetch it again with --force, or generate it again).'}"
    )
