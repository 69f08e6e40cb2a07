"""The byte stream of one downloaded file: progress forwarded to our one bar, and a deadline.

huggingface_hub times out a silent connection, but not a slow one: each file gets an overall deadline from its
size and a minimum rate, checked as bytes arrive (huggingface_hub reports them every 10 MiB), so a crawling
transfer ends in one line (exit 2). A server that trickles less than 10 MiB in all is not caught here.
"""

from __future__ import annotations

import time
from typing import Any

from ossconv.errors import OssconvError
from ossconv.progress import Progress

DEFAULT_MIN_RATE = 50_000.0  # bytes per second; the Hub's CDN gives hundreds of MB/s
DEFAULT_GRACE = 60.0  # seconds on top, for connection set-up and a slow start


def deadline(nbytes: int, min_rate: float = DEFAULT_MIN_RATE, grace: float = DEFAULT_GRACE) -> float:
    """The monotonic time by which ``nbytes`` must have arrived."""
    return time.monotonic() + grace + nbytes / min_rate


def forwarding_tqdm(progress: Progress | None, path: str, until: float, min_rate: float) -> type:
    """A silent tqdm for huggingface_hub whose byte updates feed our one progress bar, and that stops a
    transfer which has run past ``until``."""
    from tqdm.auto import tqdm

    class Forwarding(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if time.monotonic() > until:
                raise OssconvError(f"transfer slower than {min_rate:g} bytes/s (see --min-rate); stopped", path)
            if progress is not None and n:
                progress(int(n))
            return super().update(n)

    return Forwarding
