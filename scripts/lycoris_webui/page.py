"""The Networks tab's Lora page: cards (base-model badge, trigger words, filter) and the metadata editor."""
from __future__ import annotations

import html
import logging
import os
import re
from typing import Optional

from modules import shared

from lib_lycoris.errors import LycorisError
from lib_lycoris.files import read_metadata

from .api import base_model_of, inspect_network
from .host import BASE_MODEL_LABELS, HOST, _opt, model_arch, tag_name

log = logging.getLogger("lycoris")


def _embedded_preview(page, base: str, name: str, md: dict) -> Optional[str]:
    """The preview embedded in the file's metadata (A1111 >= 1.9 only; older hosts have no such method)."""
    find = getattr(page, "find_embedded_preview", None)
    return find(base, name, md) if find is not None else None


def card_item(page, entry, index: int, shared_opts) -> Optional[dict]:
    """The host's card dict for one network file (None = hidden by the base-model filter)."""
    from modules.ui_extra_networks import quote_js
    path = str(entry.path)
    base, _ = os.path.splitext(path)
    try:
        md = read_metadata(entry.path)
    except LycorisError as e:
        log.warning("%s", e)
        md = {}
    arch = base_model_of(entry.path, md)
    item = {
        "name": entry.relname,
        "filename": path,
        "shorthash": None,
        "preview": page.find_preview(base) or _embedded_preview(page, base, entry.relname, md),
        "description": page.find_description(base),
        "search_terms": [page.search_terms_from_path(path), BASE_MODEL_LABELS[arch]],
        "local_preview": f"{base}.{shared_opts.samples_format}",
        "metadata": md,
        "sort_keys": {"default": index, **page.get_sort_keys(path)},
        "sd_version": BASE_MODEL_LABELS[arch],
    }
    page.read_user_metadata(item)
    user = item["user_metadata"]
    chosen = user.get("sd version")
    if chosen in ("SD1", "SD2", "SDXL", "SD3", "Flux"):
        arch = chosen.lower()
        item["sd_version"] = chosen
    loaded = model_arch(shared.sd_model) if getattr(shared, "sd_model", None) is not None else "unknown"
    if (_opt("lycoris_hide_mismatched", False) and arch != "unknown" and loaded != "unknown"
            and arch != loaded):
        return None
    from lib_lycoris.inspect import trigger_words, training_tags
    triggers = trigger_words(md, user)
    weight = float(user.get("preferred weight", 0.0) or 0.0)
    item["prompt"] = (quote_js(f"<lora:{tag_name(entry)}:") + " + "
                      + (repr(weight) if weight else "opts.extra_networks_default_multiplier")
                      + " + " + quote_js(">"))
    if user.get("activation text"):
        item["prompt"] += " + " + quote_js(" " + user["activation text"])
    item["negative_prompt"] = quote_js("(" + user["negative text"] + ":1)") if user.get("negative text") else quote_js("")
    badge = f"[{BASE_MODEL_LABELS[arch]}]" + (f" {', '.join(triggers)}" if triggers else "")
    item["description"] = badge + (f" {item['description']}" if item.get("description") else "")
    item["metadata"] = {**md, "lycoris: base model": BASE_MODEL_LABELS[arch], "lycoris: trigger words": triggers,
                        "lycoris: training tags": training_tags(md)}
    return item


def make_page(ui_extra_networks):
    """The page class, made against the host's base class."""

    class LycorisPage(ui_extra_networks.ExtraNetworksPage):
        lycoris = True

        def __init__(self) -> None:
            super().__init__("Lora")
            self.allow_negative_prompt = True

        def refresh(self) -> None:
            HOST.refresh()

        def create_item(self, name, index=None, enable_filter=True):
            try:
                entry = HOST.runtime.index.resolve_entry(name)
            except LycorisError as e:
                log.warning("%s", e)
                return None
            if index is None:
                index = 0
            item = card_item(self, entry, index, shared.opts)
            if item is None and not enable_filter:
                with _filter_off():
                    item = card_item(self, entry, index, shared.opts)
            return item

        def list_items(self):
            for index, entry in enumerate(HOST.runtime.index.entries()):
                item = card_item(self, entry, index, shared.opts)
                if item is not None:
                    yield item

        def allowed_directories_for_previews(self):
            return [str(r) for r in HOST.roots()]

        def create_user_metadata_editor(self, ui, tabname):
            return make_editor()(ui, tabname, self)

    return LycorisPage


class _filter_off:
    def __enter__(self):
        self.old = _opt("lycoris_hide_mismatched", False)
        shared.opts.lycoris_hide_mismatched = False

    def __exit__(self, *exc):
        shared.opts.lycoris_hide_mismatched = self.old


def make_editor():
    """User metadata editor: activation text, preferred weight, negative text, notes (stored beside the file)."""
    import gradio as gr
    from modules import ui_extra_networks_user_metadata as base

    class LycorisMetadataEditor(base.UserMetadataEditor):
        def save_lycoris_user_metadata(self, name, desc, sd_version, activation_text, preferred_weight,
                                       negative_text, notes):
            md = self.get_user_metadata(name)
            md.update({"description": desc, "sd version": sd_version, "activation text": activation_text,
                       "preferred weight": preferred_weight, "negative text": negative_text, "notes": notes})
            self.write_user_metadata(name, md)

        def get_metadata_table(self, name):
            table = super().get_metadata_table(name)
            try:
                info = inspect_network(name)
            except LycorisError as e:
                table.append(("LyCORIS:", html.escape(str(e))))
                return table
            rows = [("Base model:", f"{BASE_MODEL_LABELS.get(info['base_model'], info['base_model'])} "
                                    f"({info['base_model_reason']})"),
                    ("Adapter types:", ", ".join(f"{k} ×{v}" for k, v in info["algos"].items())),
                    ("Modules:", str(info["modules"])),
                    ("Trigger words:", ", ".join(info["trigger_words"])),
                    ("Training tags:", ", ".join(f"{t} ({n})" for t, n in info["training_tags"]))]
            table += [(k, html.escape(v)) for k, v in rows if v]
            return table

        def put_values_into_components(self, name):
            from lib_lycoris.inspect import training_tags
            user = self.get_user_metadata(name)
            values = super().put_values_into_components(name)
            item = self.page.items.get(name, {})
            tags = training_tags(read_metadata(item["filename"])) if item.get("filename") else []
            return [*values[0:5], item.get("sd_version", "unknown"),
                    gr.update(value=[(t, str(n)) for t, n in tags], visible=bool(tags)),
                    user.get("activation text", ""), float(user.get("preferred weight", 0.0) or 0.0),
                    user.get("negative text", "")]

        def create_extra_default_items_in_left_column(self):
            self.select_sd_version = gr.Dropdown(["SD1", "SD2", "SDXL", "SD3", "Flux", "unknown"], value="unknown",
                                                 label="Base model", interactive=True)

        def create_editor(self):
            self.create_default_editor_elems()
            self.taginfo = gr.HighlightedText(label="Training dataset tags (click to add to the activation text)")
            self.edit_activation_text = gr.Text(label="Activation text", info="Added to the prompt with the tag")
            self.slider_preferred_weight = gr.Slider(label="Preferred weight", info="0 = the default multiplier",
                                                     minimum=0.0, maximum=2.0, step=0.01)
            self.edit_negative_text = gr.Text(label="Negative prompt", info="Added to the negative prompt")
            self.edit_notes = gr.TextArea(label="Notes", lines=4)

            def select_tag(text, evt):
                words = [w for w in re.split(r" *, *", text or "") if w]
                tag = evt.value[0]
                return ", ".join([w for w in words if w != tag] if tag in words else words + [tag])
            select_tag.__annotations__ = {"evt": gr.SelectData}   # gradio finds the event argument by its hint
            self.taginfo.select(fn=select_tag, inputs=[self.edit_activation_text],
                                outputs=[self.edit_activation_text], show_progress=False)
            self.create_default_buttons()
            viewed = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview,
                      self.edit_notes, self.select_sd_version, self.taginfo, self.edit_activation_text,
                      self.slider_preferred_weight, self.edit_negative_text]
            self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input],
                                   outputs=viewed).then(fn=lambda: gr.update(visible=True), inputs=[],
                                                        outputs=[self.box])
            edited = [self.edit_description, self.select_sd_version, self.edit_activation_text,
                      self.slider_preferred_weight, self.edit_negative_text, self.edit_notes]
            self.setup_save_handler(self.button_save, self.save_lycoris_user_metadata, edited)

    return LycorisMetadataEditor
