"""The progress and cancel protocol of every long call (``segment``, ``train``, the preview,
instance labelling, the file and zarr runs).

- ``progress(done, total)``: called after each unit of work (a tile, a step, a chunk), with
  ``done == 0`` when the call starts; ``total`` may grow when a tile is split.
- ``should_cancel()``: polled between units; True stops the call with
  ``SegmentationCancelled`` and nothing is returned or written.

Both are checked where they are passed (``checks.check_callable``), not deep in the work.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]
ShouldCancel = Callable[[], bool]


class SegmentationCancelled(RuntimeError):
    """Raised by ``segment``/``train`` when ``should_cancel()`` returned True; nothing is returned."""


def stop_if_cancelled(should_cancel: ShouldCancel | None, what: str) -> None:
    """Raise ``SegmentationCancelled("<what> cancelled; ...")`` when ``should_cancel()`` is
    True (None: never)."""
    if should_cancel is not None and should_cancel():
        raise SegmentationCancelled(what)
