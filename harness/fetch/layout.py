"""The MVTec layout an install ends in: counting it, its install marker, its summary table.

    <data_root>/<name>/<class>/train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from harness.errors import FetchError

MARKER = ".complete.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def find_dir(root: Path, accept, max_depth: int = 3) -> Path | None:
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


def write_mask(mask: np.ndarray, path: Path) -> None:
    """A binary mask as an 8-bit PNG with values 0 and 255."""
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(path)


def subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []


def count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir()
               if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def count_layout(root: str | os.PathLike) -> dict[str, dict]:
    """Per class: train, test_good, test_defective, masks and the per-folder test counts."""
    counts = {}
    root = Path(root)
    for cls in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        test = {d.name: count_images(d) for d in subfolders(cls / "test")}
        gt = cls / "ground_truth"
        masks = sum(count_images(d) for d in subfolders(gt))
        counts[cls.name] = {
            "train": count_images(cls / "train" / "good"),
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


def check_counts(card: dict, counts: dict[str, dict]) -> None:
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


def write_marker(build: Path, record: dict) -> None:
    with open(build / MARKER, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
