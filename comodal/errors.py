"""The two kinds of user-facing error: a bad configuration and bad data."""


class ConfigError(ValueError):
    """A configuration problem, with a message naming the field, the value and what is valid."""


class DataError(ValueError):
    """A problem with input data, with a message naming the file, dataset or row."""
