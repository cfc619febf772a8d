"""Progress bars: one switch for meddx's own and the libraries' it calls.

meddx shows a tqdm bar for every step that takes more than a few seconds, and its
``progress`` arguments (``--quiet`` on the command line) turn them off. Hugging Face
libraries draw bars of their own (transformers' "Loading weights" when the notes text
model loads); :func:`show_library_bars` makes them follow the same switch.

Bars over work done in worker processes show no ETA while the workers warm up
(:func:`worker_counter`): their slow first results are not a rate, and counting them made
the first ETA of a long ingest read hours.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

STARTING = "starting workers"
WARMING_UP = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # tqdm's bar without rate and ETA

_silenced = False  # whether meddx turned the Hugging Face bars off (and may turn them back on)


def show_library_bars(show: bool) -> None:
    """Show or hide Hugging Face's own progress bars (transformers, huggingface_hub) from now on.

    Hiding is meddx's ``progress=False``; showing only undoes what meddx hid, never a choice the
    user made (``HF_HUB_DISABLE_PROGRESS_BARS``, ``transformers.utils.logging.disable_progress_bar``).
    Imports nothing heavy: transformers is only told when it is loaded already; otherwise it reads
    huggingface_hub's setting when it loads.
    """
    global _silenced
    if show and not _silenced:
        return
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:  # it keeps its own copy of the setting, taken at import
        switch = transformers_logging.enable_progress_bar if show else transformers_logging.disable_progress_bar
    else:
        from huggingface_hub import utils as hub

        switch = hub.enable_progress_bars if show else hub.disable_progress_bars
    switch()
    _silenced = not show


def worker_counter(bar: Any, warm_up: int) -> Callable[[int], None]:
    """``bar.update`` for results from worker processes that are just starting.

    Until ``warm_up`` results are in, the bar shows no rate and no ETA ("starting workers"): the
    first results come slowly (each worker imports its readers' libraries, builds a tokenizer or a
    FHIR index), and an ETA from them read hours for a run of minutes. Then the rate starts afresh
    (the elapsed time still counts from the start). Resets tqdm's smoothed-rate averages, which it
    keeps private; a tqdm without them shows its plain average rate. Safe to call from another thread (a feeder
    thread reading ahead of the model).
    """
    if getattr(bar, "disable", False):
        return bar.update
    warm_up = min(warm_up, bar.total or warm_up)
    warming = [warm_up > 0]
    if warming[0]:
        bar.bar_format = WARMING_UP
        bar.set_postfix_str(STARTING)

    def count(n: int) -> None:
        bar.update(n)
        if warming[0] and bar.n >= warm_up:
            warming[0] = False
            for average in ("_ema_dn", "_ema_dt"):  # tqdm's smoothed rate: from the next result on
                if hasattr(bar, average):
                    setattr(bar, average, type(getattr(bar, average))(bar.smoothing))
            bar.bar_format = None
            bar.set_postfix_str("", refresh=False)  # shown with the next result, with its rate

    return count
