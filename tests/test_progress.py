"""Progress bars: no ETA from workers still starting; progress=False hides the Hugging Face libraries' bars too."""

from __future__ import annotations

import io

from tqdm import tqdm

from meddx.progress import STARTING, show_library_bars, worker_counter


def test_a_bar_over_workers_shows_no_eta_while_they_start_then_the_rate_of_the_rest() -> None:
    now = [1000.0]
    bar = tqdm(total=1000, file=io.StringIO(), mininterval=0, miniters=1)
    bar._time = lambda: now[0]  # a clock the test moves
    bar.start_t = bar.last_print_t = now[0]
    count = worker_counter(bar, warm_up=4)
    now[0] += 30  # the workers start: imports, a tokenizer, a FHIR index
    for _ in range(3):
        count(1)
        assert STARTING in str(bar)
        assert "<" not in str(bar)  # no ETA yet
        now[0] += 1
    for _ in range(6):  # warm: one file a second
        count(1)
        now[0] += 1
    rate = bar.format_dict["rate"]
    assert 0.8 < rate < 1.5, rate  # counting the start-up, the rate would be about 0.1/s: an ETA of hours
    assert bar.n == 9
    assert STARTING not in str(bar)
    assert "<16:" in str(bar)  # 991 files at 1/s
    assert bar.format_dict["elapsed"] == 39  # from the start, start-up included
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
