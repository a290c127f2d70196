"""The one error family for what a user gave: files, fields, prompts, checkpoint folders.

``MMInputError`` is a ``ValueError`` whose message names the input, what was expected and what was
found. ``mm-llama`` subcommands turn it into exit code 2 and one line on stderr; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class MMInputError(ValueError):
    """Bad user input: the message names the file / field / prompt, what was expected and what was found."""


class MissingInputError(MMInputError, FileNotFoundError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError``)."""


class ConversationError(MMInputError):
    """A prompt or training record whose conversation is malformed (turns, roles, markers vs media,
    length), as opposed to a media file that cannot be read."""


class LabelMaskError(MMInputError):
    """The supervised tokens of a training record are not exactly its assistant replies (plus what ends
    each turn): the chat template and the label mask disagree."""


def name_error(error: BaseException, where: str) -> BaseException:
    """``error`` with ``where`` (e.g. ``<file>:<record id>``) in front of its message: ``error`` itself when
    its message names ``where`` already, else one of its type (``MMInputError`` when that type takes other
    arguments than a message)."""
    if where in str(error):
        return error
    try:
        return type(error)(f"{where}: {error}")
    except Exception:  # an exception type that takes other arguments
        return MMInputError(f"{where}: {error}")
