"""What a host does per generation, once for every host (the WebUI glue and the standalone app).

    rt = Runtime([lora_dir, lyco_dir])                 # index of network files + parsed-network cache
    act = rt.activate(patcher, prompt_or_requests, steps=20)   # parse, resolve, load, bind, apply
    act.prompt, act.warnings, act.used                 # tags removed; one line per problem; what applied
    act.public_warnings                                # the same lines without paths: for infotext and API
    for seg in act.te_segments: ...                    # encode the prompt once per te-weight segment
    patcher.set_step(step, steps)                      # per sampling step
    patcher.restore()                                  # after the batch

A tag never crashes a generation: every problem of one network (bad tag, unknown name, unreadable
file, no matching module) becomes one warning naming the tag and the file, and the other networks go on.
Warnings name files by their full path (for the log and the UI); `public_warnings` (and `Runtime.public_text`
for the host's own lines) name them relative to their networks folder, so the infotext saved in every image
and the API carry no absolute path and no user name.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from .errors import LycorisError
from .files import addnet_hash, read_metadata
from .names import NetworkIndex
from .network import Network, load_network
from .privacy import public_text
from .tags import NetworkRequest, parse_prompt

log = logging.getLogger("lycoris")

# Default memory budget of the parsed-network cache (bytes of stored factors).
DEFAULT_CACHE_BYTES = 2 << 30


class NetworkCache:
    """LRU cache of parsed networks keyed by (path, size, mtime), bounded by a byte budget."""

    def __init__(self, budget_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(path: Path) -> tuple:
        st = os.stat(path)
        return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)

    def get(self, path: Union[str, Path], name: Optional[str] = None) -> Network:
        """The parsed network of `path`, read once while the file is unchanged."""
        try:
            key = self._key(Path(path))
        except OSError:
            return load_network(path, name)   # raises the NetworkFileError with the reason
        with self._lock:
            net = self._items.get(key)
            if net is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return net
        net = load_network(path, name)
        size = net.nbytes()
        with self._lock:
            self.misses += 1
            self._items[key] = net
            self._bytes += size
            while self._bytes > self.budget and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes()
        return net

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


def _alias(path: Path) -> Optional[str]:
    try:
        return read_metadata(path).get("ss_output_name") or None
    except LycorisError as e:
        log.warning("%s", e)
        return None


@dataclass(frozen=True)
class TeSegment:
    """Steps [start, stop] (1-based, inclusive) during which every text-encoder weight is constant."""

    start: int
    stop: int


@dataclass
class Activation:
    prompt: str                              # the prompt with the tags removed
    requests: list                           # every parsed request
    used: list = field(default_factory=list)  # (request, network) applied
    failed: list = field(default_factory=list)  # (request, LycorisError) not applied at all
    warnings: list = field(default_factory=list)         # full text, paths included: for the log and the UI
    public_warnings: list = field(default_factory=list)  # `warnings` without paths: for infotext and API
    te_segments: list = field(default_factory=list)
    hashes: list = field(default_factory=list)   # (name, short hash) for the infotext `Lora hashes` field
    stats: object = None


def te_segments(requests: Sequence[NetworkRequest], total: int, hires: bool = False) -> list:
    """Split steps 1..total where any request's text-encoder weight changes (see `TeSegment`)."""
    cuts = {1}
    for r in requests:
        prev = None
        for s in range(1, total + 1):
            w = tuple(r.weight(te, "BASE", s, total, hires) for te in ("te1", "te2", "te3"))
            if prev is not None and w != prev:
                cuts.add(s)
            prev = w
    starts = sorted(cuts)
    return [TeSegment(a, (starts[i + 1] - 1) if i + 1 < len(starts) else total) for i, a in enumerate(starts)]


class Runtime:
    """Network folders, the name index and the parsed-network cache of one host process."""

    def __init__(self, roots: Iterable[Union[str, Path]], cache_bytes: int = DEFAULT_CACHE_BYTES,
                 presets: Optional[Mapping[str, Sequence[float]]] = None) -> None:
        """Args: roots: network folders, searched in order; presets: LBW presets besides the built-in ones
        (e.g. `blocks.load_user_presets(extension_root)[0]`)."""
        self.roots = [Path(r) for r in roots]
        # Folders as messages spell them (as given) and as resolved (symlinks, relative roots).
        self._public_roots = list(dict.fromkeys([*self.roots, *(r.resolve() for r in self.roots)]))
        self.presets = dict(presets) if presets else None
        self.index = NetworkIndex(self.roots, read_alias=_alias)
        self.cache = NetworkCache(cache_bytes)
        self._hashes: dict = {}

    def short_hash(self, path: Union[str, Path]) -> Optional[str]:
        """A1111's short hash of a network (`Lora hashes`): `sshs_model_hash` metadata, else the sha256 of the
        safetensors data (`files.addnet_hash`); 12 hex digits, computed once per (path, mtime)."""
        p = Path(path)
        try:
            key = (str(p), p.stat().st_mtime_ns)
        except OSError as e:
            log.warning("cannot hash %s: %s", p, e)
            return None
        h = self._hashes.get(key)
        if h is None:
            try:
                h = (read_metadata(p).get("sshs_model_hash") or addnet_hash(p))[:12]
            except (OSError, LycorisError) as e:
                log.warning("cannot hash %s: %s", p, e)
                return None
            self._hashes[key] = h
        return h

    def public_text(self, text: str) -> str:
        """`text` fit for the infotext and the API: a path inside a networks folder becomes its name there,
        any other absolute path its file name, a home folder '~' (`privacy.public_text`)."""
        return public_text(text, self._public_roots)

    def refresh(self) -> None:
        self.index.rescan()

    def load(self, name: str) -> Network:
        entry = self.index.resolve_entry(name)
        return self.cache.get(entry.path, entry.stem)

    def activate(self, patcher, prompt: Union[str, Sequence[NetworkRequest]], steps: int, *,
                 hires: bool = False, mode: str = "merge", step: int = 1) -> Activation:
        """Parse (if given a prompt), resolve, load, bind and apply; never raises for a tag's problem.
        Every warning is logged once here and listed in `Activation.warnings` (full text) and, in the same
        order without paths, in `Activation.public_warnings`."""
        if isinstance(prompt, str):
            parsed = parse_prompt(prompt, presets=self.presets)
            act = Activation(prompt=parsed.prompt, requests=list(parsed.requests), warnings=list(parsed.warnings))
        else:
            act = Activation(prompt="", requests=list(prompt))
        items = []
        load_s = 0.0
        for req in act.requests:
            if not hires:
                act.warnings += req.check_steps(steps)
            try:
                t0 = time.perf_counter()
                net = self.load(req.name)
                load_s += time.perf_counter() - t0
                report = patcher.prepare(net)
            except LycorisError as e:
                act.warnings.append(f"<{req.kind}:{req.name}> skipped: {e}")
                act.failed.append((req, e))
                continue
            act.warnings += [f"<{req.kind}:{req.name}> {w}" for w in report.warnings()]
            mm = getattr(patcher, "modelmap", None)
            lbw = getattr(req, "lbw", None)
            if lbw is not None and mm is not None and not lbw.fits(mm.arch, mm.depth):
                act.warnings.append(f"<{req.kind}:{req.name}> lbw={lbw.text} names no block of this {mm.arch} "
                                    f"model; its block weights are ignored (see docs/tags.md for the {mm.arch} list)")
            items.append((net, req, mode))
            act.used.append((req, net))
        act.stats = patcher.apply(items, step=step, total=steps, hires=hires, load_s=load_s)
        warn = getattr(act.stats, "warnings", None)   # modules a network could not act on (low-bit weights)
        if callable(warn):
            act.warnings += warn()
        act.hashes = [(req.name, h) for req, net in act.used if (h := self.short_hash(net.path))]
        # only applied networks that have text-encoder modules: a UNet-only (or missing) network with a
        # schedule must not make the host encode the prompt once per segment for nothing
        act.te_segments = te_segments([req for req, net in act.used
                                       if any(m.component != "unet" for m in net.modules.values())],
                                      steps, hires)
        for w in act.warnings:     # logged here, once; hosts show them (UI, infotext) without logging again
            log.warning("%s", w)
        act.public_warnings = [self.public_text(w) for w in act.warnings]
        return act
