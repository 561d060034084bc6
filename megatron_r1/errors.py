"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback wall."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, layout). The message names what and where."""


class ConfigError(UserError):
    """A config file or override is malformed or inconsistent; the message names the field."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not match the model."""


class DataError(UserError):
    """A dataset row or file is malformed; the message names file and line."""
