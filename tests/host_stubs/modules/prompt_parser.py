"""The conditioning containers of A1111 modules/prompt_parser.py (same names and fields)."""
from collections import namedtuple

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def reconstruct_cond_batch(c, current_step):
    """The cond of each prompt at 0-based `current_step` (A1111's rule: first entry with step <= end)."""
    out = []
    for schedule in c:
        target = next((i for i, e in enumerate(schedule) if current_step <= e.end_at_step), 0)
        out.append(schedule[target].cond)
    return out
