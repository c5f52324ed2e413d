"""Run the ``emo`` CLI and stop the process with SIGSTOP once the cache writer has written ROWS rows.

Usage: python stop_after_rows.py ROWS EMO-ARGUMENTS...

ROWS 0 stops right after the partial cache file has been opened. The test that starts this script
waits for the stop and then sends SIGKILL, so each kill lands at a known point of the extraction
without any hook in the library. The patched methods call the library's own methods first; the
only change is the stop after them.
"""

import os
import signal
import sys

from emo import cli
from emo.cache import writer as cache_writer


def main() -> None:
    """Install the stop after ROWS written rows and run the CLI with the remaining arguments."""
    rows = int(sys.argv[1])
    original_enter = cache_writer.CacheWriter.__enter__
    original_write = cache_writer.CacheWriter.write

    def enter_then_stop(self):
        result = original_enter(self)
        if rows == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
        return result

    def write_then_stop(self, *args, **kwargs):
        original_write(self, *args, **kwargs)
        if rows > 0 and len(self.file["written"]) - len(self.pending_rows()) >= rows:
            os.kill(os.getpid(), signal.SIGSTOP)

    cache_writer.CacheWriter.__enter__ = enter_then_stop
    cache_writer.CacheWriter.write = write_then_stop
    cli.main(args=sys.argv[2:], prog_name="emo")


if __name__ == "__main__":
    main()
