"""Run the relay under cProfile in every thread: `cprofile_relay.py OUT.pstats relay-args...`.

cProfile only sees the thread that enables it, and the relay runs each session
in its own thread, so a profile hook starts one profiler per thread on the
thread's first call. The clock is the thread's CPU time (user + system), not
the wall clock: a thread blocked in recv() or waiting for the GIL costs
nothing, so the figures show where the CPU goes. At exit the profiles are
merged into OUT.pstats (`python -m pstats OUT.pstats` to browse).
"""

import cProfile
import os
import pstats
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relay_lib.cli import main  # noqa: E402 (after the path is set)

_profiles = []
_lock = threading.Lock()


def _start_profiler(frame, event, arg):
    sys.setprofile(None)  # this hook has done its job in this thread
    profiler = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(profiler)
    profiler.enable()


def run(out: str, argv) -> int:
    threading.setprofile(_start_profiler)
    main_profiler = cProfile.Profile(time.thread_time)
    _profiles.append(main_profiler)
    main_profiler.enable()
    try:
        return main(argv)
    finally:
        main_profiler.disable()
        with _lock:
            profiles = list(_profiles)
        stats = None
        for profiler in profiles:
            profiler.create_stats()
            if not profiler.stats:
                continue
            if stats is None:
                stats = pstats.Stats(profiler)
            else:
                stats.add(profiler)
        if stats is not None:
            stats.dump_stats(out)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
