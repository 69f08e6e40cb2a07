"""The progress interface the library reports through; the command line plugs a tqdm bar into it.

Kept free of torch and tqdm so that anything may import it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    """Called with the bytes (or units) just done; ``add_total`` announces work planned, so a bar can show
    how much is left before the work starts."""

    def __call__(self, count: int) -> None: ...

    def add_total(self, count: int) -> None: ...


class NoProgress:
    """The default: report to nobody."""

    def __call__(self, count: int) -> None:
        pass

    def add_total(self, count: int) -> None:
        pass
