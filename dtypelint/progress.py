"""Progress bars on stderr for work that takes more than a second (tqdm, which transformers brings).

A pseudo-terminal may report a size of 0 x 0, from which tqdm derives -1 rows and draws nothing at all: the
size falls back to 80 x 24 then. Work without a known total (loading) shows its elapsed time, refreshed by a thread.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DELAY = 1.0  # seconds before a bar appears: quick work stays silent
_REFRESH = 0.5


@contextmanager
def progress_bar(enabled: bool, description: str, total: int | None = None, unit: str = "it") -> Iterator[Callable[[], object] | None]:
    """Yields the bar's ``update`` (None when disabled). The bar is cleared when the work is done."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    size = shutil.get_terminal_size(fallback=(80, 24))
    bar_format = None if total is not None else "{desc}: {elapsed}"
    bar = tqdm(total=total, desc=description, unit=unit, delay=DELAY, leave=False, ncols=size.columns,
               nrows=size.lines, bar_format=bar_format)
    done = threading.Event()
    ticker = threading.Thread(target=_tick, args=(bar, done), daemon=True)
    ticker.start()
    try:
        yield bar.update
    finally:
        done.set()
        ticker.join()
        bar.close()


def _tick(bar: object, done: threading.Event) -> None:
    """Redraw the bar while the work runs: tqdm redraws only on update(), which work without a total or a
    long module never calls."""
    while not done.wait(_REFRESH):
        bar.refresh()  # type: ignore[attr-defined]
