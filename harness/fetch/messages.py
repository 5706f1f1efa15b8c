"""Progress messages of a fetch, on stderr so that stdout stays the installed path."""

from __future__ import annotations

import sys


def say(message: str, enabled: bool = True) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
