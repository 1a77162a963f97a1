"""Child processes that end with their parent (imports nothing heavy: a child imports it first)."""

from __future__ import annotations

import os
import signal
import threading
import time


def exit_with_parent(parent: int) -> None:
    """For a child process (sweep workers, bench ops' memory case): a daemon thread that ends this
    process within a second of ``parent``'s end; Ctrl-C (SIGINT to the whole process group) is left
    to the parent, which stops its children (an idle worker printed a KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
