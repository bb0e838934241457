"""The project's own error types: bad input always surfaces as one of these, naming file and field."""


class FedSenseError(Exception):
    """Base class of every error FedSense raises for bad input or state."""


class ConfigError(FedSenseError, ValueError):
    """An invalid configuration; the message starts with ``path: field.path: reason``."""


class DataError(FedSenseError, ValueError):
    """An unreadable or invalid data file; the message starts with the file path."""


class OutputError(FedSenseError):
    """An output that would replace or lie inside an input, or replace an old output without ``--overwrite``."""
