"""tqdm progress bars that can be switched off (and fall back to nothing without tqdm)."""
from __future__ import annotations

import contextlib


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield _NoBar()
        return
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) as bar:
        yield bar
