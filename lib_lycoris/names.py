"""Network names: the index of network files under the networks folders and name -> file resolution.

A tag names a network by (in this order, first match wins):

1. its path relative to a networks folder, with or without extension (`styles/ink v2`);
2. its file stem (`ink v2`), if only one file has it;
3. its alias from metadata (`ss_output_name`), if only one file has it and it is nobody's stem.

Each step tries the exact text first, then a case-insensitive match. Names and file names are compared in
Unicode NFC form (macOS stores NFD). '\\' counts as '/'. A name that is absolute (`/x`, `C:x`, `~x`) or has a
`..` part is rejected, and a file whose real path (after symlinks) lies outside its folder is never indexed,
so no name can reach outside the networks folders. Folders are searched in the order given.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from .errors import LycorisError, NameResolutionError

__all__ = ["NETWORK_EXTENSIONS", "NetworkEntry", "NetworkIndex", "normalize_name"]

logger = logging.getLogger("lycoris")

NETWORK_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
_ABSOLUTE = re.compile(r"^(?:/|~|[A-Za-z]:)")
# How many close names an error message suggests.
_SUGGESTIONS = 3

ReadAlias = Callable[[Path], Optional[str]]


def normalize_name(name: str) -> str:
    """NFC form, '\\' -> '/', no surrounding spaces, no empty or '.' parts."""
    text = unicodedata.normalize("NFC", name).strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    return "/".join(parts) if not text.startswith("/") else "/" + "/".join(parts)


def _strip_extension(name: str) -> str:
    lower = name.lower()
    for ext in NETWORK_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


@dataclass(frozen=True)
class NetworkEntry:
    """One network file.

    Attributes:
        path: the file path (root joined with `relpath`, symlinks not resolved).
        root: the networks folder it was found under.
        stem: file name without extension (NFC).
        relpath: path relative to `root`, '/' separated, with extension (NFC).
        alias: `ss_output_name` or whatever `read_alias` returned, else None.
    """

    path: Path
    root: Path
    stem: str
    relpath: str
    alias: Optional[str] = None

    @property
    def relname(self) -> str:
        """`relpath` without extension: what a tag writes for a file in a sub-folder."""
        return _strip_extension(self.relpath)


class NetworkIndex:
    """Index of the network files under one or more folders.

    Args:
        roots: networks folders, searched in this order.
        read_alias: optional callable path -> alias (e.g. `ss_output_name` from safetensors metadata); errors
            it raises (OSError, ValueError, LycorisError) are logged and the file gets no alias.
        extensions: file suffixes to index (lower case).
    """

    def __init__(self, roots: Sequence[Union[str, Path]], read_alias: Optional[ReadAlias] = None,
                 extensions: Iterable[str] = NETWORK_EXTENSIONS) -> None:
        self.roots = [Path(r) for r in roots]
        self.read_alias = read_alias
        self.extensions = tuple(e.lower() for e in extensions)
        self.warnings: list[str] = []
        self._entries: list[NetworkEntry] = []
        self.rescan()

    # --- scanning -------------------------------------------------------------------------------------------
    def rescan(self) -> None:
        """Walk the folders again (symlinked folders are not entered; symlinked files must stay inside)."""
        self.warnings = []
        entries: list[NetworkEntry] = []
        for root in self.roots:
            if not root.is_dir():
                self._warn(f"networks folder {str(root)!r} does not exist")
                continue
            real_root = root.resolve()
            for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
                dirnames.sort()
                for filename in sorted(filenames):
                    if not filename.lower().endswith(self.extensions):
                        continue
                    entry = self._entry(root, real_root, Path(dirpath) / filename)
                    if entry is not None:
                        entries.append(entry)
        self._entries = entries

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        logger.warning("%s", message)

    def _entry(self, root: Path, real_root: Path, path: Path) -> Optional[NetworkEntry]:
        real = path.resolve()
        if not _inside(real, real_root):
            self._warn(f"{str(path)!r} points outside the networks folder ({str(real)!r}); ignored")
            return None
        if not real.is_file():
            return None
        relpath = unicodedata.normalize("NFC", path.relative_to(root).as_posix())
        stem = unicodedata.normalize("NFC", _strip_extension(path.name))
        alias = None
        if self.read_alias is not None:
            try:
                alias = self.read_alias(path)
            except (OSError, ValueError, LycorisError) as e:
                self._warn(f"cannot read the alias of {relpath!r}: {e}")
            if alias is not None:
                alias = normalize_name(str(alias)) or None
        return NetworkEntry(path=path, root=root, stem=stem, relpath=relpath, alias=alias)

    # --- queries --------------------------------------------------------------------------------------------
    def entries(self) -> list[NetworkEntry]:
        """Every indexed file, folders in order, files sorted within a folder."""
        return list(self._entries)

    def resolve(self, name: str) -> Path:
        """The file a tag name means.

        Raises:
            NameResolutionError: empty, absolute or escaping name; no file; several files with that stem or
                alias (the message lists them: write the sub-folder path to choose); a file that now points
                outside its folder.
        """
        return self.resolve_entry(name).path

    def resolve_entry(self, name: str) -> NetworkEntry:
        """Like `resolve`, returning the whole entry."""
        wanted = normalize_name(name)
        if not wanted:
            raise NameResolutionError("empty network name", key=name)
        if _ABSOLUTE.match(wanted):
            raise NameResolutionError("network names are relative to the networks folder; absolute paths "
                                      "are not allowed", key=name)
        if ".." in wanted.split("/"):
            raise NameResolutionError("network name goes outside the networks folder ('..')", key=name)
        bare = _strip_extension(wanted)
        for fold in (False, True):
            key = (lambda s: s.casefold()) if fold else (lambda s: s)
            found = self._first_root([e for e in self._entries
                                      if key(e.relpath) == key(wanted) or key(e.relname) == key(bare)])
            if found:
                return self._checked(found[0], name)
            found = [e for e in self._entries if key(e.stem) == key(bare)]
            if len(found) == 1:
                return self._checked(found[0], name)
            if len(found) > 1:
                raise NameResolutionError(
                    f"several networks are called {bare!r}: {', '.join(e.relpath for e in found)}; "
                    "write the sub-folder path to choose", key=name)
            stems = {key(e.stem) for e in self._entries}
            found = [e for e in self._entries if e.alias is not None and key(e.alias) == key(wanted)
                     and key(e.alias) not in stems]
            if len(found) == 1:
                return self._checked(found[0], name)
            if len(found) > 1:
                raise NameResolutionError(
                    f"alias {wanted!r} is used by several networks: {', '.join(e.relpath for e in found)}; "
                    "write the file name to choose", key=name)
        names = sorted({e.relname for e in self._entries} | {e.stem for e in self._entries})
        close = difflib.get_close_matches(bare, names, n=_SUGGESTIONS)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        folders = ", ".join(repr(str(r)) for r in self.roots) or "none"
        raise NameResolutionError(f"no network called {wanted!r} in the networks folders ({folders}){hint}",
                                  key=name)

    def _first_root(self, found: list[NetworkEntry]) -> list[NetworkEntry]:
        """Of the entries found by relative path, those of the first folder (folders are searched in order)."""
        if not found:
            return []
        return [e for e in found if e.root == found[0].root]

    @staticmethod
    def _checked(entry: NetworkEntry, name: str) -> NetworkEntry:
        # Checked again at resolve time: a file may have been replaced by a symlink since the scan.
        if not _inside(entry.path.resolve(), entry.root.resolve()):
            raise NameResolutionError("network file points outside the networks folder", key=name,
                                      file=str(entry.path))
        return entry


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True
