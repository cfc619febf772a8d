"""Progress bars: one switch for meddx's own and the libraries' it calls.

meddx shows a tqdm bar for every step that takes more than a few seconds, and its
``progress`` arguments (``--quiet`` on the command line) turn them off. Hugging Face
libraries draw bars of their own (transformers' "Loading weights" when the notes text
model loads); :func:`show_library_bars` makes them follow the same switch.

Bars over work done in worker processes start their clock at the first result
(:func:`first_result`): the seconds the workers take to start are not a rate, and counting
them made the first ETA of a long ingest read hours.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

STARTING = "starting workers"

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


def first_result(bar: Any) -> None:
    """Start ``bar``'s clock (rate and ETA) now, at the first result from workers that have just started.

    Clears the "starting workers" note. Elapsed time counts from here too.
    """
    if getattr(bar, "disable", False):
        return
    bar.reset(total=bar.total)  # the clock and the rate estimates from now (and n from 0: call it first)
    bar.set_postfix_str("", refresh=False)


def counter(bar: Any) -> Callable[[int], None]:
    """``bar.update`` for results from workers: the first count starts the bar's clock (:func:`first_result`).

    Safe to call from another thread (a feeder thread reading ahead of the model).
    """
    started = False

    def count(n: int) -> None:
        nonlocal started
        if not started:
            started = True
            first_result(bar)
        bar.update(n)

    return count
