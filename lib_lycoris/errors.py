"""Typed errors of the engine.

Every error carries the file and the key (or tag) it is about, so the host can show one clear message.
The host catches `LycorisError` per network, logs one warning and goes on with the other networks.
"""
from __future__ import annotations

from typing import Optional, Sequence


class LycorisError(Exception):
    """Base class of every error the engine raises on purpose.

    Args:
        message: what went wrong, in words a user understands.
        file: the network file (or checkpoint) concerned, if any.
        key: the tensor key, module name or tag concerned, if any.
    """

    def __init__(self, message: str, *, file: Optional[str] = None, key: Optional[str] = None) -> None:
        self.message = message
        self.file = file
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(f"file {self.file!r}")
        if self.key:
            where.append(f"key {self.key!r}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class NetworkFileError(LycorisError):
    """A network file cannot be read: missing, truncated, malformed header, unsafe pickle, bad dtype."""


class UnsafeFileError(NetworkFileError):
    """A pickle needs code to load (refused, never run)."""


class FormatError(LycorisError):
    """The tensors of one module do not form a known adapter, or their shapes disagree with each other."""

    def __init__(self, message: str, *, file: Optional[str] = None, key: Optional[str] = None,
                 keys: Sequence[str] = ()) -> None:
        self.keys = tuple(keys)
        super().__init__(message, file=file, key=key)


class ShapeMismatchError(LycorisError):
    """A module's delta does not fit the model weight it maps to (e.g. an SD1 network on SDXL)."""

    def __init__(self, message: str, *, file: Optional[str] = None, key: Optional[str] = None,
                 expected: Optional[tuple] = None, got: Optional[tuple] = None) -> None:
        self.expected = expected
        self.got = got
        super().__init__(message, file=file, key=key)


class NonFiniteError(LycorisError):
    """A tensor holds NaN or infinity."""


class ModelMismatchError(LycorisError):
    """A network does not fit the loaded model at all (nothing or too little matched)."""


class TagError(LycorisError):
    """A prompt tag cannot be parsed or resolved (bad numbers, empty or escaping names, bad lists)."""


class NameResolutionError(TagError):
    """A network name resolves to no file, or to a path outside the networks folder."""


class CheckpointFileError(LycorisError):
    """A model checkpoint cannot be read (missing, a folder, not safetensors, truncated, bad header) or the
    merged checkpoint cannot be written (folder missing, not writable, disk full)."""


class PartialMergeError(LycorisError):
    """A strict merge refused: some modules would not be merged (the model lacks them, or their delta does not
    fit the weight). `problems` holds one (network file, module, reason) per such module."""

    def __init__(self, message: str, *, file: Optional[str] = None, key: Optional[str] = None,
                 problems: Sequence[tuple] = ()) -> None:
        self.problems = tuple(problems)
        super().__init__(message, file=file, key=key)
