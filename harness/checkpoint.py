"""Checkpoints hold tensors and plain Python values only, and are read with ``weights_only=True``.

A checkpoint is an untrusted file: ``torch.load`` with full unpickling runs whatever code a
crafted file names. The loop's state therefore avoids every other type (NumPy's RNG state is
stored as a tensor and rebuilt on load), and a file that needs more than tensors and plain values
to unpickle is refused with an error that names it, without running anything from it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import HarnessError

FORMAT = "flowad-checkpoint/1"


class CheckpointError(HarnessError):
    """A checkpoint is corrupt, foreign, or was written for another run."""


def numpy_rng_state() -> dict[str, Any]:
    """``np.random.get_state()`` as plain values and a tensor (its 624-word key)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def save(state: dict[str, Any], handle) -> None:
    """Write ``state`` (tensors and plain values) to an open binary file."""
    torch.save({"format": FORMAT, **state}, handle)


def load(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save``; CheckpointError for a corrupt or foreign file."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refused a type: the file wants code run to be read. Nothing was executed.
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it was not written by "
            f"this harness (or was tampered with); it was not loaded. Delete it and train again. "
            f"({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt: {err}). Delete it and "
            f"train again, or restore it from a backup."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint of this harness (no format {FORMAT!r}); it was not used. "
            f"Point --out at a run folder written by `flowad train`."
        )
    return state
