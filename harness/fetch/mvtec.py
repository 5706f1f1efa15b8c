"""MVTec AD (and any source already in the MVTec layout) -> the install folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from harness.errors import FetchError
from harness.fetch.layout import find_dir


def convert_mvtec(raw_root: str | os.PathLike, out_root: str | os.PathLike,
                  classes: Sequence[str], move: bool = False) -> dict:
    """Put MVTec-layout class folders found under ``raw_root`` into ``out_root``.

    ``move`` renames instead of copying (for folders fetch extracted itself). The publisher's
    licence and readme files at the top level come along.
    """
    raw_root, out_root = Path(raw_root), Path(out_root)
    root = find_dir(raw_root, lambda d: any((d / c / "train").is_dir() for c in classes))
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
