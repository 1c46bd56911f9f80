"""Network names: the index of network files under the networks folders and name -> file resolution.

A tag names a network by (in this order, first match wins):

1. its path relative to a networks folder, with or without extension (`styles/ink v2`);
2. its file stem (`ink v2`), if only one file has it;
3. its alias from metadata (`ss_output_name`), if only one file has it and it is nobody's stem.

Each step tries the exact text first, then a case-insensitive match. Names and file names are compared in
Unicode NFC form (macOS stores NFD). '\\' counts as '/'. Folders are searched in the order given.

No name can reach outside the networks folders: a name is looked up among the files found inside them, never
joined to a path, and a file whose real path (after symlinks) lies outside its folder is never indexed, nor
resolved if it became such a link after the scan. On top of that, names that try are refused with a message
saying why:

- absolute (`/x`, `C:x`, `~x`, `\\\\server\\x`) or with a `..` part (or a part of dots and spaces only, which
  Windows reads as `..`);
- control characters (NUL included) and invisible format characters: bidi overrides and isolates that show a
  name reversed, soft hyphen, BOM, lone surrogates. A zero-width (non-)joiner is allowed between two letters,
  marks, digits or symbols, where Persian, Indic scripts and emoji sequences need it;
- lookalikes that would do the same: a name's *skeleton* (NFKC form, known homoglyphs of '/', '\\', '.' and ':'
  replaced by them, marks and format characters dropped) must not be absolute or have a `..` part either.
  A lookalike elsewhere stays allowed (Japanese file names use '／' and '：' where Windows forbids '/' and ':').
"""
from __future__ import annotations

import difflib
import errno
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

# Homoglyphs NFKC leaves alone, and what they look like (Unicode confusables.txt; the NFKC ones such as
# U+FF0F FULLWIDTH SOLIDUS, U+FF0E FULLWIDTH FULL STOP, U+2024 ONE DOT LEADER, U+FE52 SMALL FULL STOP are
# mapped by the normalisation itself).
_LOOKALIKES = {
    **dict.fromkeys("\u2215\u2044\u29f8\u2571\u27cb\u3033\u1735", "/"),   # DIVISION/FRACTION SLASH, BIG SOLIDUS, ...
    **dict.fromkeys("\u29f9\u2216\u2572\u27cd\ufe68", "\\"),             # BIG REVERSE SOLIDUS, SET MINUS, ...
    **dict.fromkeys("\u3002\u00b7\u2219\u22c5\u30fb\u2e31\u0701\u0702\ua60e\U00010a50\ua4f8\u0660\u06f0\u1427",
                    "."),                                              # IDEOGRAPHIC FULL STOP, MIDDLE DOT, ...
    **dict.fromkeys("\u0589\u05c3\ua789\u2236\u02d0", ":"),                # ARMENIAN FULL STOP, RATIO, ...
}
# Joiners allowed between two characters of these Unicode categories (letters, marks, digits, symbols).
_JOINERS = ("\u200c", "\u200d")
_JOINABLE = ("L", "M", "N", "S")
# A skeleton is absolute if it starts with '/' or is a drive ('C:' alone or before a separator); '～' and 'Ａ：'
# followed by text are ordinary characters in a name.
_SKELETON_ABSOLUTE = re.compile(r"^(?:/|[A-Za-z]:(?:/|$))")


def normalize_name(name: str) -> str:
    """NFC form, '\\' -> '/', no surrounding spaces, no empty or '.' parts."""
    text = unicodedata.normalize("NFC", name).strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    return "/".join(parts) if not text.startswith("/") else "/" + "/".join(parts)


def _char(c: str) -> str:
    return f"U+{ord(c):04X} {unicodedata.name(c, '')}".rstrip()


def _bad_character(name: str) -> Optional[str]:
    """Why `name` holds a character no network name may hold (see module doc), or None."""
    for i, c in enumerate(name):
        cat = unicodedata.category(c)
        if cat == "Cc":
            return f"a control character {_char(c)}"
        if c in _JOINERS:
            near = (name[i - 1] if i else "", name[i + 1] if i + 1 < len(name) else "")
            if all(n and unicodedata.category(n)[0] in _JOINABLE for n in near):
                continue
            return f"an invisible character {_char(c)} that joins nothing here"
        if cat in ("Cf", "Cs"):
            return f"an invisible character {_char(c)}"
    return None


def _skeleton(name: str) -> str:
    """What a name looks like: NFKC, homoglyphs of '/', '\\', '.', ':' replaced by them, '\\' -> '/', combining
    marks and format characters dropped."""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(_LOOKALIKES.get(c, c) for c in text if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    return text.replace("\\", "/").strip()


def _escapes(parts: list) -> bool:
    """A '..' part, or one of dots and spaces only (Windows drops trailing dots and spaces: '.. ' is '..')."""
    return any(p.strip(". ") == "" and p.count(".") >= 2 for p in parts)


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
            try:
                real_root = _real_path(root)
            except OSError as e:
                self._warn(f"networks folder {str(root)!r}: cannot follow its symlink ({e.strerror or e})")
                continue
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
        try:
            real = _real_path(path)
        except OSError as e:
            self._warn(f"{str(path)!r}: cannot follow its symlink ({e.strerror or e}); ignored")
            return None
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
        bad = _bad_character(wanted)
        if bad:
            raise NameResolutionError(f"network name holds {bad}", key=name)
        if _ABSOLUTE.match(wanted):
            raise NameResolutionError("network names are relative to the networks folder; absolute paths "
                                      "are not allowed", key=name)
        if _escapes(wanted.split("/")):
            raise NameResolutionError("network name goes outside the networks folder ('..')", key=name)
        look = _skeleton(wanted)
        if _SKELETON_ABSOLUTE.match(look) or _escapes(look.split("/")):
            odd = sorted({c for c in wanted if c not in look or unicodedata.normalize("NFKC", c) != c
                          or c in _LOOKALIKES})
            what = "absolute paths" if _SKELETON_ABSOLUTE.match(look) else "names that go outside the folder"
            raise NameResolutionError(f"network name looks like {look!r} ({', '.join(map(_char, odd))}); "
                                      f"{what} are not allowed", key=name)
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
        try:
            inside = _inside(_real_path(entry.path), _real_path(entry.root))
        except OSError as e:
            raise NameResolutionError(f"network file is a symlink that cannot be followed ({e.strerror or e})",
                                      key=name, file=str(entry.path)) from e
        if not inside:
            raise NameResolutionError("network file points outside the networks folder", key=name,
                                      file=str(entry.path))
        return entry


def _real_path(path: Path) -> Path:
    """`path` with every symlink followed; OSError for a loop (Python 3.11 raises RuntimeError there, 3.13 an
    OSError) or a part that cannot be read."""
    try:
        return path.resolve()
    except RuntimeError as e:   # "Symlink loop from ..."
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from e


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True
