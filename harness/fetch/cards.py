"""Dataset cards: datasets/<name>.yaml says where a dataset's files live and how to convert them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from harness.errors import FetchError

CARD_FORMATS = ("mvtec", "mtd", "mstc")


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
    found.append(Path(__file__).resolve().parents[2] / "datasets")  # harness/fetch/cards.py -> project
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
