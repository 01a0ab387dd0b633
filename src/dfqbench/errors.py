"""User-facing errors: printed as one line, exit status 2, no result written."""


class ConfigError(ValueError):
    """Bad input from the user (config value, missing file, checksum mismatch)."""
