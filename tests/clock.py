"""A clock the test moves by hand: admission, the task store and the driver take one, so no test
depends on how fast this machine is."""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
