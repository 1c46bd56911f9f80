"""What a network file holds, for the `inspect` command, the Networks tab and the API.

`describe(network) -> dict`: adapter types and counts, base model (and why), rank/alpha summary,
targeted components and blocks, trigger words and training tags from metadata, unknown keys.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Optional

from .blocks import block_id, coarse_block
from .dit import block_counts
from .errors import LycorisError
from .network import Network, flux_variant

# How many training tags the summary lists (A1111's metadata editor shows 24).
TOP_TAGS = 24
# A1111 build_tags: captions whose average tag length is at least this are sentences, split into words.
_SENTENCE_TAG_LENGTH = 16


def training_tags(metadata: dict, top: int = TOP_TAGS) -> list:
    """[(tag, count)] from kohya `ss_tag_frequency`, most frequent first (A1111's build_tags rule)."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        freq = json.loads(raw)
    except json.JSONDecodeError:
        return []
    counts: Counter = Counter()
    if isinstance(freq, dict):
        for tags in freq.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)):
                        counts[str(tag).strip()] += int(n)
    if counts and sum(len(t) for t in counts) / len(counts) >= _SENTENCE_TAG_LENGTH:
        words: Counter = Counter()
        for tag, n in counts.items():
            for w in re.findall(r"[-_\w']+", tag):
                if len(w) >= 3:
                    words[w] += n
        counts = words
    return [(t, n) for t, n in counts.most_common(top) if t]


def trigger_words(metadata: dict, user: Optional[dict] = None) -> list:
    """Activation words: user metadata `activation text`, then `modelspec.trigger_phrase`; in that order."""
    out = []
    if user and user.get("activation text"):
        out += [w.strip() for w in str(user["activation text"]).split(",") if w.strip()]
    phrase = metadata.get("modelspec.trigger_phrase")
    if phrase:
        out += [w.strip() for w in phrase.split(",") if w.strip()]
    seen = set()
    return [w for w in out if not (w in seen or seen.add(w))]


def _depth_of(network: Network) -> tuple:
    """(double/joint, single) blocks a transformer file names, at least the family's usual counts (a file
    may train only some blocks): the in/mid/out thirds `inspect` reports then match the model's."""
    double, single = block_counts((m.body for m in network.modules.values()), native=None)
    if network.base_model == "flux":
        return max(double, 19), max(single, 38)
    return (38 if double > 24 else 24), 0      # SD3 / SD3.5 Medium 24 blocks, SD3.5 Large 38


def describe(network: Network, user_metadata: Optional[dict] = None) -> dict:
    md = network.metadata
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    comps: Counter = Counter()
    blocks: Counter = Counter()
    arch = network.base_model if network.base_model != "unknown" else "sd1"
    variant = flux_variant(md, network.modules) if arch == "flux" else None
    depth = _depth_of(network) if arch in ("sd3", "flux") else ()
    for m in network.modules.values():
        comps[m.component] += 1
        r = m.adapter.rank()
        if r is not None:
            ranks[r] += 1
        alphas[round(m.scale * r, 4) if r else None] += 1
        if m.component == "unet":
            try:
                b = block_id("unet", m.body, arch, depth)
            except LycorisError:   # a path outside the standard blocks: counted as 'other'
                b = None
            blocks[b or "other"] += 1
        else:
            blocks["BASE"] += 1
    coarse: Counter = Counter()
    for b, n in blocks.items():
        coarse[(coarse_block(b) if b not in ("other",) else None) or "other"] += n
    return {
        "name": network.name,
        "file": str(network.path),
        "size_bytes": network.size,
        "base_model": network.base_model,
        "base_model_reason": network.base_model_reason,
        "variant": variant,
        "modules": len(network.modules),
        "algos": dict(network.algos),
        "components": dict(comps),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": {str(k): v for k, v in alphas.items()},
        # str(): block ids of transformers are `BlockId` (a str subclass), which orjson (A1111's API
        # responses) refuses as a dict key ("Dict key must be str")
        "blocks": {str(k): v for k, v in sorted(blocks.items())},
        "coarse_blocks": {str(k): v for k, v in coarse.items()},
        "trigger_words": trigger_words(md, user_metadata),
        "training_tags": training_tags(md),
        "output_name": md.get("ss_output_name"),
        "unknown_keys": list(network.unknown_keys),
        "metadata_keys": sorted(md),
    }
