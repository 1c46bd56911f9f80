"""Texts made fit to publish: absolute paths and user names out of warnings bound for the infotext.

The infotext is saved in every image's PNG metadata and returned by the API, so it must not carry the user's
folders. `public_text(text, roots)` rewrites every absolute path in a message:

- a path inside one of the networks folders (`roots`) -> its path relative to that folder, '/' separated
  (the network's name as a tag writes it); the folder itself -> its last part (`Lora`);
- a home folder (`~`, `~bob`, `/home/bob`, `/Users/bob`, `C:\\Users\\bob`, `/root`) -> `~`;
- any other absolute path (`/...`, `~/...`, `C:\\...`, `C:/...`, `\\\\server\\share\\...`) -> its last part.

Paths are found quoted (`'...'` or `"..."`, also as Python's repr writes them, backslashes doubled; a quoted path
may hold spaces) or bare (then a path ends at white space, a quote, `<>|*?:`, and loses trailing
punctuation). POSIX and Windows spellings are handled on every OS. The full text stays for the log and the UI.
"""
from __future__ import annotations

import functools
import re
from pathlib import PurePath
from typing import Iterable, Sequence, Union

__all__ = ["public_text"]

PathLike = Union[str, PurePath]

# Where an absolute path starts: '/', a home ('~', '~/', '~bob'; not a schedule's '0.5~10'), a drive ('C:\' or
# 'C:/') or a UNC share ('\\').
_START = r"""(?:/|~(?=[\\/A-Za-z_'"]|$)|[A-Za-z]:[\\/]|\\\\)"""
# A quoted path: the quote, a path start, then anything but that quote (backslash escapes kept whole).
_QUOTED = rf"""(?P<q>['"])(?P<qbody>{_START}(?:\\.|(?!(?P=q))[^\\\n])*)(?P=q)"""
# A bare path: not glued to a word or a path before it; runs to white space, a quote or a character
# no file name holds on Windows ('<>|*?:' and control characters).
_BARE_BODY = r"""[^\s'"<>|*?:\x00-\x1f]*"""
_BARE = (rf"(?<![\w.~/\\])(?P<bare>(?:/(?=[^\s'\"<>|*?:])|[A-Za-z]:[\\/]|\\\\(?=\w)){_BARE_BODY}"
         rf"|~[A-Za-z_][\w.-]*(?:[\\/]{_BARE_BODY})?|~[\\/]{_BARE_BODY})")
# Punctuation that ends a sentence rather than a bare path.
_TRAILING = ".,;!"
_CLOSERS = {")": "(", "]": "[", "}": "{"}
# Folders whose children are home folders (user names), compared case-insensitively.
_HOME_PARENTS = ("home", "users")
_SEPARATORS = re.compile(r"[\\/]+")
_DRIVE = re.compile(r"^[A-Za-z]:$")


def _parts(path: str) -> list[str]:
    return [p for p in _SEPARATORS.split(path) if p]


def _windows(parts: Sequence[str]) -> bool:
    return bool(parts) and bool(_DRIVE.match(parts[0]))


def _is_home(path: str, parts: Sequence[str]) -> bool:
    if path.startswith("~"):
        return len(parts) == 1
    body = list(parts[1:]) if _windows(parts) else list(parts)
    if body == ["root"] and not _windows(parts):
        return True
    # The first 'home' or 'Users' part is the folder of homes: the path is a home if it ends one part below.
    first = next((i for i, part in enumerate(body) if part.lower() in _HOME_PARENTS), None)
    return first is not None and len(body) == first + 2


def _same(a: Sequence[str], b: Sequence[str]) -> bool:
    if _windows(a) or _windows(b):     # Windows file names ignore case
        return [x.casefold() for x in a] == [x.casefold() for x in b]
    return list(a) == list(b)


def _public_path(path: str, roots: Sequence[list[str]]) -> str:
    """The public form of one absolute path (see the module doc)."""
    parts = _parts(path)
    if not parts:                       # '/' or '\\' alone says nothing
        return path
    for root in roots:
        if len(parts) >= len(root) and _same(parts[: len(root)], root):
            rest = parts[len(root):]
            if rest:
                return "/".join(rest)
            break                       # the folder itself: its last part, below
    if _is_home(path, parts) or parts[-1].startswith("~"):    # '/srv/~bob' names a user too
        return "~"
    return parts[-1]


def _trim(token: str) -> tuple[str, str]:
    """(path, trailing punctuation) of a bare token: '/a/b).' -> ('/a/b', ').') unless '(' is in the path."""
    end = len(token)
    while end > 1:
        c = token[end - 1]
        if c in _TRAILING or (c in _CLOSERS and token.count(_CLOSERS[c], 0, end) < token.count(c, 0, end)):
            end -= 1
            continue
        break
    return token[:end], token[end:]


def _root_parts(roots: Iterable[PathLike]) -> list[list[str]]:
    out = []
    for r in roots:
        text = str(r)
        if re.match(_START, text) and not text.startswith("~"):
            parts = _parts(text)
            if parts and parts not in out:
                out.append(parts)
    return sorted(out, key=len, reverse=True)    # the deepest folder first (nested roots)


def _root_pattern(parts: Sequence[str]) -> str:
    """A bare spelling of a networks folder (its parts may hold spaces), with the path below it."""
    body = r"[\\/]+".join(re.escape(p) for p in parts)
    if _windows(parts):
        body = f"(?i:{body})"
    else:
        body = r"[\\/]+" + body
    return rf"{body}(?:[\\/]+{_BARE_BODY})?(?![^\s\\/'\"<>|*?:.,;!)\]}}])"


@functools.lru_cache(maxsize=8)     # one Runtime asks with the same folders every time
def _pattern(root_parts: tuple) -> re.Pattern:
    """Quoted paths, then bare spellings of the folders (deepest first), then other bare paths."""
    rooted = "|".join(_root_pattern(parts) for parts in root_parts)
    bare = f"(?<![\\w.~/\\\\])(?P<rooted>{rooted})|{_BARE}" if rooted else _BARE
    return re.compile(f"{_QUOTED}|{bare}")


def public_text(text: str, roots: Iterable[PathLike] = ()) -> str:
    """`text` with every absolute path replaced by its public form; the user name never appears.

    Args:
        text: a message (a warning, an error's str()).
        roots: the networks folders, absolute (relative ones are ignored: pass their resolved form too).
    Returns:
        The text with paths inside `roots` relative to their folder, home folders as `~` and every other
        absolute path cut to its last part; everything else unchanged.
    """
    root_parts = _root_parts(roots)

    def sub(m: re.Match) -> str:
        if m.group("qbody") is not None:
            q = m.group("q")
            return f"{q}{_public_path(m.group('qbody'), root_parts)}{q}"
        path, tail = _trim(m.groupdict().get("rooted") or m.group("bare"))
        return _public_path(path, root_parts) + tail

    return _pattern(tuple(tuple(parts) for parts in root_parts)).sub(sub, text)
