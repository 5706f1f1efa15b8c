"""Fetch a dataset named by its card and install it in the MVTec layout.

    datasets/<name>.yaml (card) -> download (resume, checksum) -> safe extraction -> converter
    -> <data_root>/<name>/<class>/train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png

One module per job: ``cards`` (reading a card), ``downloader`` (resume and checksum), ``unpack``
(safe extraction), ``mvtec`` / ``mtd`` / ``mstc`` (one converter per dataset), ``layout`` (counts,
marker, summary) and ``install`` (``fetch`` itself: sources, locking, the atomic install).

Where the bytes come from, first match wins:
  1. ``source=`` (CLI ``--source``): an archive file, a folder holding the card's archives by file
     name (a local mirror), a folder already extracted, an archive URL, or a mirror base URL;
  2. the environment variable FLOWAD_MIRROR (a mirror base URL or folder);
  3. the upstream URLs in the card.
"""

from harness.fetch.cards import CARD_FORMATS, card_path, find_project_root, load_card
from harness.fetch.downloader import download, file_sha256
from harness.fetch.install import ARCHIVE_SUFFIXES, DOWNLOADS, MIRROR_ENV, fetch
from harness.fetch.layout import IMAGE_SUFFIXES, MARKER, count_layout, format_summary, read_marker
from harness.fetch.mstc import MSTC_PROTOCOLS, convert_mstc
from harness.fetch.mtd import MTD_CLASS, MTD_DEFECT_FOLDERS, convert_mtd
from harness.fetch.mvtec import convert_mvtec
from harness.fetch.unpack import safe_extract

__all__ = [
    "ARCHIVE_SUFFIXES", "CARD_FORMATS", "DOWNLOADS", "IMAGE_SUFFIXES", "MARKER", "MIRROR_ENV",
    "MSTC_PROTOCOLS", "MTD_CLASS", "MTD_DEFECT_FOLDERS", "card_path", "convert_mstc", "convert_mtd",
    "convert_mvtec", "count_layout", "download", "fetch", "file_sha256", "find_project_root",
    "format_summary", "load_card", "read_marker", "safe_extract",
]
