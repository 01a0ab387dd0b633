"""User-facing errors: printed as one line, exit status 2, no result written."""


class ConfigError(ValueError):
    """Bad input from the user (config value, missing file, checksum mismatch)."""


class UnsupportedModel(RuntimeError):
    """The method cannot handle this model (an untraceable graph, an op outside its model): the run fails."""
