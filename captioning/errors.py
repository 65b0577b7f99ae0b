"""Errors in what a user gave: a data file, an image folder, an option's value, a checkpoint.

Their message names the file or the option and the cause, so ``train.py`` prints it as one line (``error: ...``)
instead of a traceback through Lightning's setup, which buried it under some fifteen frames. They are ValueErrors
(and the missing-file one a FileNotFoundError too), so code that caught those before still catches them.
"""

from __future__ import annotations


class InputError(ValueError):
    """Something a user gave cannot be used; the message names it and says why."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file a user named does not exist; the message names it."""


class InputIsADirectoryError(InputError, IsADirectoryError):
    """A file a user named is a folder; the message names it."""


class InputUnavailableError(InputError, OSError):
    """Something a user named could not be fetched (torchvision weights offline); the message names it, where from,
    and what to do instead."""


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a loss that is NaN or infinite; the message names the step. Not a user's input, but
    ``train.py`` prints it as one line too: the step and what to do say all there is (a traceback through
    Lightning's loops adds nothing)."""
