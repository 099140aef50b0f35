"""Every error deltatune raises on purpose is a DeltatuneError: the message names the problem and the fix."""


class DeltatuneError(Exception):
    """Base class: catch this to handle any problem deltatune detected."""


class ConfigError(DeltatuneError, ValueError):
    """A method option, site or model choice is invalid."""


class SiteError(ConfigError):
    """A site matches no module of the model, or is unknown for its architecture."""


class AdapterFileError(DeltatuneError):
    """A saved adapter or checkpoint cannot be read safely (missing, corrupt, wrong shapes, wrong base)."""


class DataError(DeltatuneError, ValueError):
    """Training or evaluation data is malformed."""


class TrainingError(DeltatuneError, RuntimeError):
    """Training cannot go on (for example a NaN loss)."""


class StorageError(DeltatuneError, OSError):
    """Writing to disk failed (disk full, no permission, read-only); the previous files are kept."""
