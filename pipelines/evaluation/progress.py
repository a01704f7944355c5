"""Progress lines for long evaluations (files read, images scored), on stderr.

Throttled by time, so a short evaluation prints nothing and a long one prints a line every
`every_s` seconds plus the last one of each stage; stdout stays the COCO/LVIS summary alone.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`update(stage, done, total, unit)`; `every_s=None` is silent, `0` prints every update."""

    def __init__(self, every_s: float | None = 10.0, stream: TextIO | None = None):
        self.every_s = every_s
        self.stream = stream
        self.start = time.perf_counter()
        self._last: dict[str, float] = {}

    def update(self, stage: str, done: int, total: int, unit: str, detail: str = "") -> None:
        if self.every_s is None:
            return
        now = time.perf_counter()
        last = self._last.get(stage)
        due = now - (self.start if last is None else last) >= self.every_s
        # the last update of a stage is printed when an earlier one was (or whenever every_s is 0)
        if due or (done >= total and (last is not None or self.every_s == 0)):
            self._last[stage] = now
            extra = f", {detail}" if detail else ""
            print(f"evaluate: {stage} {done}/{total} {unit}{extra} ({now - self.start:.1f} s)",
                  file=self.stream or sys.stderr, flush=True)
