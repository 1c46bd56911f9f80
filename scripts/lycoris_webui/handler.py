"""The `lora` / `lyco` extra network: activation per batch, hand-back to the built-in, infotext, trigger words."""
from __future__ import annotations

import logging
import re

from modules import extra_networks, shared

from lib_lycoris.errors import LycorisError
from lib_lycoris.tags import parse_prompt

from .host import (HOST, INFOTEXT_HASHES, INFOTEXT_TRIGGERS, INFOTEXT_WARNING_LIMIT, INFOTEXT_WARNINGS, MODES,
                   TAGS_PLACEHOLDER, Host, _opt, model_components)
from .steps import _install_cond_wrapper, forget_conds_after

log = logging.getLogger("lycoris")


def _tags_of(params_list) -> str:
    """The host's ExtraNetworkParams back to tag text, for the engine's parser (full grammar)."""
    return " ".join("<lora:" + ":".join(str(i) for i in params.items) + ">" for params in params_list)


def _pass_steps(p) -> tuple:
    hires = bool(getattr(p, "is_hr_pass", False))
    steps = int(getattr(p, "steps", 1) or 1)
    if hires:
        steps = int(getattr(p, "hr_second_pass_steps", 0) or steps)
    return steps, hires


class ExtraNetworkLycoris(extra_networks.ExtraNetwork):
    """The `lora` extra network: activate = resolve + load + apply; deactivate = networks parked (kept applied
    for the next generation; restored, bit-exact, when the set changes, the model changes or the extension
    unloads) or restored (setting lycoris_keep_applied off).

    Hand-back (never worse than the built-in): on a model whose family the engine does not map (or one the
    user sets to the built-in), and for a generation whose every network is a file the engine cannot map
    but the built-in can read, the params go unchanged to the handler the built-in Lora registered
    (`builtin`); its deactivate follows. One loader per generation: a file is never applied twice, and two
    loaders never hold backups of one weight.
    """

    def __init__(self, host: Host = HOST) -> None:
        super().__init__("lora")
        self.host = host
        self.builtin = None       # the built-in Lora's handler, kept when ours replaced it (take_over)
        self.handed_back = False  # the built-in applied this generation's networks

    def activate(self, p, params_list) -> None:
        host = self.host
        sd_model = getattr(p, "sd_model", None) or shared.sd_model
        reason = host.handback_reason(sd_model) if self.builtin is not None and sd_model is not None else None
        if reason is not None:
            self._hand_back(p, params_list, reason, lasting=True)
            return
        self._settle_builtin(p, sd_model)
        try:
            act = self._apply(p, params_list, sd_model)
        except Exception as e:   # out of memory, a host quirk: the image is made without the networks
            log.exception("applying networks failed; generating without them")
            self._give_up(p, e)
            return
        if act is None or not act.failed or act.used or self.builtin is None:
            return
        readable = [req for req, e in act.failed if builtin_can_read(host, req.name)]
        if len(readable) == len(act.requests):
            host.restore()
            self._hand_back(p, params_list, "the engine cannot map "
                            + ", ".join(f"<lora:{r.name}>" for r in readable) + "; the built-in Lora can")

    def _apply(self, p, params_list, sd_model):
        host = self.host
        steps, hires = _pass_steps(p)
        parsed = parse_prompt(_tags_of(params_list))
        with host.lock:
            if not parsed.requests and host._patcher is None:
                host.activation = None
                return None
            patcher = host.patcher(sd_model)
            mode = _opt("lycoris_apply_mode", "merge")
            act = host.runtime.activate(patcher, parsed.requests, steps, hires=hires,
                                        mode=mode if mode in MODES else "merge", step=1)
            act.warnings[:0] = parsed.warnings
            act.public_warnings[:0] = [host.runtime.public_text(w) for w in parsed.warnings]
            host.activation, host.steps, host.hires = act, steps, hires
            host.processing = p
            host.release_idle_backups(sd_model)
        for w in parsed.warnings:   # the tag parse is ours; the engine logged its own warnings
            log.warning("%s", w)
        if act.requests:
            _write_infotext(p, act, hires)
            _add_trigger_words(p, act)
            _install_cond_wrapper(p)
        return act

    def _give_up(self, p, error: Exception) -> None:
        """After a failure inside apply (the Patcher has rolled its writes back): the model at base, the
        generation goes on without networks, and the image says so."""
        try:
            self.host.restore()
        finally:
            self.host.activation = None
        forget_conds_after(p)   # else the host's cond cache serves this network-free result to the next image
        text = f"networks not applied ({type(error).__name__}: {error}); the image is generated without them"
        if hasattr(p, "comment"):
            p.comment(text)
        params = getattr(p, "extra_generation_params", None)
        if params is not None:
            params[INFOTEXT_WARNINGS] = self.host.runtime.public_text(text)[:INFOTEXT_WARNING_LIMIT].replace('"', "'")
            params.pop(INFOTEXT_HASHES, None)

    def _hand_back(self, p, params_list, reason: str, lasting: bool = False) -> None:
        """This generation's tags to the built-in handler, exactly as the host gave them to us; lasting: for
        the whole model (its family), so our kept backups are freed (else both loaders would hold copies)."""
        if self.host.activation is not None or self.host._patcher is not None:
            self.host.restore()
        patcher = self.host._patcher
        if patcher is not None and lasting:
            # our kept backups of the weights the built-in will back up too would double the memory
            # (SD3 CLIP-G: +2.6 GB in float32)
            freed = patcher.release_backups()
            if freed:
                log.info("freed %d MB of kept weight backups (networks of this model go to the built-in Lora)",
                         freed >> 20)
        if params_list:
            log.info("<lora> tags handed to the built-in Lora: %s", reason)
        self.handed_back = True
        self.builtin.activate(p, params_list)

    def _settle_builtin(self, p, sd_model) -> None:
        """After a generation the built-in applied: its networks off and its weights back, before ours write."""
        if not self.handed_back:
            return
        self.handed_back = False
        self.builtin.activate(p, [])
        restored = restore_builtin_weights(sd_model)
        log.info("built-in Lora networks removed (%d weights restored) before lycoris-loader applies", restored)

    def deactivate(self, p) -> None:
        if self.handed_back and self.builtin is not None:
            self.builtin.deactivate(p)
            return
        self.host.end_generation()


# Suffixes the built-in Lora of A1111 1.7-1.10 reads (extensions-builtin/Lora network_*.py), for hand-back.
BUILTIN_SUFFIXES = frozenset({
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight", "alpha", "scale",
    "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
    "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b", "w_norm", "b_norm", "weight",
    "on_input", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "oft_blocks", "oft_diag", "rescale",
    "bias_indices", "bias_values", "bias_size",
})


def builtin_can_read(host: Host, name: str) -> bool:
    """Whether the built-in Lora could read a network file our engine refused: decided from its key
    patterns alone (kohya-style `<module>.<suffix>` keys, the module before the first dot, as the built-in
    splits them, and only suffixes it knows). A missing file or an unreadable header: False."""
    from lib_lycoris.files import read_header
    try:
        header = read_header(host.runtime.index.resolve(name))
    except (LycorisError, OSError) as e:
        log.debug("hand-back check of %s: %s", name, e)
        return False
    keys = [k for k in header if k != "__metadata__"]
    return bool(keys) and all(k.startswith(("lora_", "lycoris_")) and k.partition(".")[2] in BUILTIN_SUFFIXES
                              for k in keys)


def restore_builtin_weights(sd_model) -> int:
    """A1111's built-in restores its weights lazily, at the next forward of each layer; ours write before
    that, so its backups go back now (`networks.network_restore_weights_from_backup`, A1111 1.5+). Returns
    the modules restored; 0 where the built-in is not A1111's (Forge's patches live in its own patcher)."""
    import sys
    builtin = sys.modules.get("networks")
    restore = getattr(builtin, "network_restore_weights_from_backup", None)
    if restore is None or sd_model is None:
        return 0
    n = 0
    for comp in model_components(sd_model).values():
        for module in comp.modules():
            if getattr(module, "network_current_names", ()):
                restore(module)
                module.network_current_names = ()
                n += 1
            # its backups are no longer needed (it makes new ones when it next applies); kept, they and ours
            # would hold two copies of every weight both patched
            if getattr(module, "network_weights_backup", None) is not None:
                module.network_weights_backup = None
            if getattr(module, "network_bias_backup", None) is not None:
                module.network_bias_backup = None
    return n


def _write_infotext(p, act, hires: bool) -> None:
    params = getattr(p, "extra_generation_params", None)
    if params is None:
        return
    if hasattr(p, "comment"):
        for w in act.warnings:
            p.comment(w)
    if act.warnings:   # the infotext is saved in every image: no paths, no user name
        text = "; ".join(act.public_warnings or act.warnings)
        if len(text) > INFOTEXT_WARNING_LIMIT:
            text = text[: INFOTEXT_WARNING_LIMIT - 1] + "…"
        params[INFOTEXT_WARNINGS] = text.replace('"', "'")
    if not _opt("lycoris_add_hashes_to_infotext", True):
        return
    # A1111 #16062: the hires pass adds to the first pass's hashes instead of replacing them.
    hashes = getattr(p, "lycoris_hashes", None) if hires else None
    hashes = dict(hashes or {})
    for name, h in act.hashes:
        hashes[name.replace(":", "").replace(",", "")] = h
    p.lycoris_hashes = hashes
    if hashes:
        params[INFOTEXT_HASHES] = ", ".join(f"{k}: {v}" for k, v in hashes.items())


def _add_trigger_words(p, act) -> None:
    """Opt-in: the networks' trigger words into the prompts of this batch, before they are encoded."""
    top = int(_opt("lycoris_trigger_words", 0))
    if top == 0 or getattr(p, "is_hr_pass", False) or not getattr(p, "prompts", None):
        return
    from lib_lycoris.inspect import trigger_words
    words = []
    for req, net in act.used:
        found = trigger_words(net.metadata, extra_networks.get_user_metadata(str(net.path)))
        words += found if top < 0 else found[:top]
    if not words:
        return
    p.prompts = [insert_words(prompt, words) for prompt in p.prompts]
    if hasattr(p, "extra_generation_params"):
        p.extra_generation_params[INFOTEXT_TRIGGERS] = ", ".join(dict.fromkeys(words))


def insert_words(prompt: str, words: list) -> str:
    """`_tags_` replaced by the words not already in the prompt, or those words appended."""
    lowered = prompt.lower()
    fresh = [w for w in dict.fromkeys(words)
             if not re.search(r"(?<!\w)" + re.escape(w.lower()) + r"(?!\w)", lowered)]
    text = ", ".join(fresh)
    if TAGS_PLACEHOLDER in prompt:
        return prompt.replace(TAGS_PLACEHOLDER, text)
    if not fresh:
        return prompt
    return f"{prompt}, {text}" if prompt.strip() else text


EXTRA_NETWORK = ExtraNetworkLycoris()
_ANNOUNCED: list = []   # the take-over is logged once (it is repeated: A1111's built-in registers again)


def take_over() -> None:
    """Make ours the `lora` handler, the `lyco` alias and the Lora page (idempotent).

    A1111 runs before_ui callbacks in reverse registration order, so the built-in Lora extension's
    before_ui runs after ours and registers its handler and page again; this is therefore also called
    from the first on_before_component (all before_ui done, Networks tab not yet built) and on_app_started.
    """
    current = extra_networks.extra_network_registry.get("lora")
    if current is not EXTRA_NETWORK:
        if current is not None:   # the built-in's handler: tags it applies better than we can go back to it
            EXTRA_NETWORK.builtin = current
        extra_networks.register_extra_network(EXTRA_NETWORK)
        if not _ANNOUNCED:
            _ANNOUNCED.append(True)
            log.info("lycoris-loader handles <lora:...> and <lyco:...> (built-in Lora handler kept for hand-back)")
    extra_networks.register_extra_network_alias(EXTRA_NETWORK, "lyco")
    try:
        from modules import ui_extra_networks
    except ImportError as e:   # no UI (tests, hosts without gradio): tags still work
        log.debug("no Networks tab page: %s", e)
        return
    pages = ui_extra_networks.extra_pages
    if any(getattr(pg, "name", None) == "lora" and not getattr(pg, "lycoris", False) for pg in pages) or \
            not any(getattr(pg, "lycoris", False) for pg in pages):
        pages[:] = [pg for pg in pages if getattr(pg, "name", None) != "lora"]
        from .page import make_page   # page -> api -> handler: imported here, not at the top
        ui_extra_networks.register_page(make_page(ui_extra_networks)())


