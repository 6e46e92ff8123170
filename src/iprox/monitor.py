"""Peak resident memory of this process during a block, sampled from /proc (Linux)."""

from __future__ import annotations

import threading
import time


def rss_gib() -> float:
    """Current resident set size in GiB (0.0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak``: the highest RSS (GiB) seen every 20 ms inside."""

    def __init__(self, interval: float = 0.02):
        self.peak = 0.0
        self.interval = interval
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_gib())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss_gib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_gib())
