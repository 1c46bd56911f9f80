"""Records the callbacks a script registers (A1111 modules/script_callbacks.py names)."""
callbacks = {}


def _add(kind):
    def register(fn):
        callbacks.setdefault(kind, []).append(fn)
    return register


for _kind in ("before_ui", "ui_settings", "model_loaded", "cfg_denoiser", "infotext_pasted", "app_started",
              "script_unloaded", "before_component", "ui_tabs"):
    globals()["on_" + _kind] = _add(_kind)
