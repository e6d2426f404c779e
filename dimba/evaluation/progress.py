"""Progress of a long evaluation: one bar per section (tqdm: done/total, rate, elapsed and ETA) on stderr.

    progress = Progress()                       # Progress(enabled=False): silent (tests, non-interactive use)
    with progress.section("generation@32", total=16) as tick:
        ...; tick(8)                            # 8 more items done

Sections are named as in the report's `timings_s`. A section's items are what it loops over: val batches for the
likelihood, sequences for generation, prompted continuation and infilling, generated batches for speed.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr

    @contextmanager
    def section(self, name: str, total: int) -> Iterator[Callable[[int], None]]:
        """A bar for `total` items; yields tick(n) that advances it by n."""
        if not self.enabled:
            yield lambda n=1: None
            return
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"[eval] {name}", file=self.stream, leave=True, dynamic_ncols=True,
                   bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}, {rate_fmt}")
        try:
            yield lambda n=1: bar.update(n)
        finally:
            bar.close()
