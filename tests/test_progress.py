"""Progress bars: the clock of a bar over workers starts at their first result; progress=False hides
the Hugging Face libraries' own bars too."""

from __future__ import annotations

import io

from tqdm import tqdm

from meddx.progress import STARTING, counter, show_library_bars


def test_a_bar_over_workers_starts_its_clock_at_the_first_result() -> None:
    now = [1000.0]
    bar = tqdm(total=1000, file=io.StringIO(), mininterval=0, miniters=1)
    bar._time = lambda: now[0]  # a clock the test moves
    bar.start_t = bar.last_print_t = now[0]
    bar.set_postfix_str(STARTING)
    count = counter(bar)
    now[0] += 30  # the workers start: imports, a tokenizer, a FHIR index
    for _ in range(5):  # then one file a second
        count(1)
        now[0] += 1
    rate = bar.format_dict["rate"]
    assert 0.8 < rate < 1.5, rate  # counting the start-up, the rate would be about 0.1/s: an ETA of hours
    assert bar.n == 5 and STARTING not in str(bar)
    bar.close()


def test_progress_false_hides_transformers_bars_and_true_brings_them_back() -> None:
    import transformers.utils.logging as hf_logging

    show_library_bars(True)  # undo what an earlier quiet run in this process did
    hf_logging.enable_progress_bar()
    show_library_bars(False)
    assert not hf_logging.is_progress_bar_enabled()
    show_library_bars(True)
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the user's own choice stays
    show_library_bars(True)
    assert not hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
