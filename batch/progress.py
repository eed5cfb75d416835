"""Progress of a batch run: tqdm bars (total and per slide) on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Told about each finished field; ``start`` gets the fields to do per slide in this run."""

    def start(self, per_slide: dict[str, int]) -> None: ...

    def advance(self, slide_id: str, status: str) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


class LogProgress(Progress):
    """A line every ``every_s`` seconds (fields done, fields/s, ETA) and one per finished slide."""

    def __init__(self, write: Callable[[str], None] | None = None, *, every_s: float = 10.0) -> None:
        self._write = write or (lambda text: print(text, file=sys.stderr, flush=True))
        self._every = every_s
        self._left: dict[str, int] = {}
        self._total = self._count = self._failed = 0
        self._started = self._last = time.monotonic()

    def start(self, per_slide: dict[str, int]) -> None:
        self._left = dict(per_slide)
        self._total = sum(per_slide.values())
        self._started = self._last = time.monotonic()
        self._write(f"batch: {self._total} fields to process in {len(per_slide)} slides")

    def advance(self, slide_id: str, status: str) -> None:
        self._count += 1
        self._failed += status == "failed"
        if slide_id in self._left:
            self._left[slide_id] -= 1
            if self._left[slide_id] == 0:
                self._write(f"batch: slide {slide_id} finished")
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            self._write(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self._count / elapsed
        eta = (self._total - self._count) / rate if rate > 0 else 0
        share = 100.0 * self._count / self._total if self._total else 100.0
        return (f"batch: {self._count}/{self._total} fields ({share:.0f}%), {rate:.1f} fields/s, "
                f"ETA {_duration(eta)}, {self._failed} failed")

    def message(self, text: str) -> None:
        self._write(text)

    def close(self) -> None:
        if self._total:
            self._write(self.line())


class BarProgress(Progress):
    """tqdm: a total bar and one bar per slide in progress (removed when the slide is finished)."""

    def __init__(self, *, max_slide_bars: int = 8) -> None:
        self._bars: dict[str, object] = {}
        self._positions: dict[str, int] = {}
        self._left: dict[str, int] = {}
        self._max = max_slide_bars
        self._total = None

    def start(self, per_slide: dict[str, int]) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._left = dict(per_slide)
        self._total = tqdm(total=sum(per_slide.values()), desc="all slides", unit="field", position=0,
                           dynamic_ncols=True, smoothing=0.1)

    def advance(self, slide_id: str, status: str) -> None:
        self._total.update(1)
        bar = self._bars.get(slide_id)
        if bar is None and slide_id in self._left and len(self._bars) < self._max:
            position = min(set(range(1, self._max + 1)) - set(self._positions.values()))
            bar = self._tqdm(total=self._left[slide_id], desc=slide_id[:24], unit="field", leave=False,
                             position=position, dynamic_ncols=True)
            self._bars[slide_id] = bar
            self._positions[slide_id] = position
        if bar is not None:
            bar.update(1)
        if slide_id in self._left:
            self._left[slide_id] -= 1
            if self._left[slide_id] == 0:
                if bar is not None:
                    bar.close()
                    del self._bars[slide_id], self._positions[slide_id]
                self._tqdm.write(f"slide {slide_id} finished", file=sys.stderr)

    def message(self, text: str) -> None:
        if self._total is not None:
            self._tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        if self._total is not None:
            self._total.close()


def make_progress(mode: str = "auto", *, every_s: float = 10.0) -> Progress:
    """``auto``: bars when stderr is a terminal, else log lines; ``bar``, ``log`` or ``none`` to choose."""
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    if mode == "bar":
        return BarProgress()
    if mode == "log":
        return LogProgress(every_s=every_s)
    if mode == "none":
        return Progress()
    raise ValueError(f"progress must be auto, bar, log or none, got {mode!r}")
