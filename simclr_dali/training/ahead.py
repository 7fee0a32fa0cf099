"""An epoch boundary that does not wait: the next epoch's loader is built in a thread while the current epoch's
last steps train (an epoch's data and augmentations depend on the seed and the epoch alone, so when it is
built changes nothing)."""
from __future__ import annotations

import threading

AHEAD_FRACTION = 0.05  # the next epoch's pipeline is built during the last 5% of an epoch's steps (2 at least)


class NextEpoch:
    """The next epoch's loader, built in a thread while the current epoch's last steps train, so that an epoch
    boundary does not wait for the pipeline's build (which grows with the files listed) and its first batches. DALI
    keeps the pipeline being defined per thread, so a thread may build one while another pipeline runs."""

    def __init__(self):
        self.epoch, self.thread, self.result, self.error = None, None, None, None

    def start(self, epoch: int, build) -> None:
        def run():
            try:
                self.result = build()
            except BaseException as err:  # raised where the loader is taken, in the training thread
                self.error = err

        self.epoch, self.result, self.error = epoch, None, None
        self.thread = threading.Thread(target=run, name=f"epoch-{epoch}-pipeline", daemon=True)
        self.thread.start()

    def take(self, epoch: int):
        """The loader built for `epoch`, or None (none was started for it)."""
        if self.thread is None:
            return None
        self.thread.join()
        result, error, built_for = self.result, self.error, self.epoch
        self.thread = self.result = self.error = self.epoch = None
        if built_for != epoch:
            return None
        if error is not None:
            raise error
        return result

    def discard(self) -> None:
        """A run that stops before the next epoch: its loader is dropped once built."""
        self.take(-1)
