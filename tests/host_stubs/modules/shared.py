"""shared.opts / shared.cmd_opts / shared.sd_model as plain attributes."""
from types import SimpleNamespace

opts = SimpleNamespace(samples_format="png")
cmd_opts = SimpleNamespace(lora_dir=None, lyco_dir_backcompat=None)
sd_model = None
