"""Errors a user can act on. Each message names the file or setting at fault and says what to do."""


class HarnessError(Exception):
    """Base class: anything the harness refuses to do, with a message meant for the user."""


class ConfigError(HarnessError, ValueError):
    """A setting in params.yaml or on the command line is missing or invalid."""


class DatasetError(HarnessError, ValueError):
    """A dataset folder does not follow the MVTec layout or holds a bad file."""


class FetchError(HarnessError):
    """A download, checksum, extraction or conversion failed; nothing half-installed is left."""


class TrainingError(HarnessError, RuntimeError):
    """Training cannot go on (for example a NaN loss); the last good checkpoint is kept."""
