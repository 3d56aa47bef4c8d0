"""Errors of the checkpoint layer: each says what was expected, what was found, what to do."""


class CheckpointError(Exception):
    """A checkpoint cannot be read or used. The message is a one-line, user-facing reason."""


class UnsupportedArchitecture(CheckpointError):
    """The checkpoint is readable but is not a model family mtplx runs (unknown model_type)."""
