"""The user-facing errors: each message names the field, file or value and what is valid."""


class ComodalError(ValueError):
    """Base of every error the command line reports as one message with exit status 2."""


class ConfigError(ComodalError):
    """A configuration problem, with a message naming the field, the value and what is valid."""


class DataError(ComodalError):
    """A problem with input data, with a message naming the file, dataset or row."""


class TrainingError(ComodalError):
    """Training produced a value that cannot be trusted (a non-finite loss or embedding),
    named by task, epoch and step."""
