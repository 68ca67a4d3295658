"""Threads of skvq's own kernels, and the BLAS hold that keeps them efficient.

The searches and the statistics cut their rows into tasks for a persistent
pool of threads (NumPy and BLAS release the GIL).  While the pool works,
every BLAS library is held to one thread (:class:`BlasHold`), so the cores
are not oversubscribed; the hold is reference-counted across concurrent
calls, so that calls from several user threads at once restore exactly the
limits the first one found.  The hold also keeps a small LAPACK call of
SciPy's (on a BLAS of its own) from waking threads that would spin on the
cores NumPy's BLAS needs next.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

from sklearn import get_config
from threadpoolctl import ThreadpoolController

# Score elements of the smallest task handed to another thread: below this,
# dispatching costs more than it saves.
TASK_ELEMENTS = 2**19


@lru_cache(maxsize=1)
def _blas_controller():
    # Inspecting the loaded libraries is slow (~0.1 ms): do it once.
    return ThreadpoolController().select(user_api="blas")


class BlasHold:
    """Hold every BLAS library to one thread while any search of ours runs.

    ``threadpoolctl``'s context managers save and restore the limits around
    one block of code, so overlapping uses from several user threads can
    restore each other's "1" and leave the process limited.  This hold is
    reference-counted instead: the first search to enter saves the limits
    and sets them to 1, the last to leave restores what the first saved.
    Between the two, :func:`default_threads` reads the saved limits, so
    concurrent searches still use the whole machine.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None

    def limits(self):
        """The BLAS limits that the user set (not our temporary hold)."""
        with self._lock:
            if self._saved is not None:
                return [n for _, n in self._saved]
        return [lib.num_threads for lib in _blas_controller().lib_controllers]

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                libs = _blas_controller().lib_controllers
                self._saved = [(lib, lib.num_threads) for lib in libs]
                for lib, n in self._saved:
                    if n != 1:
                        lib.set_num_threads(1)
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in self._saved:
                    if n != 1:
                        lib.set_num_threads(n)
                self._saved = None


BLAS_HOLD = BlasHold()


@contextmanager
def blas_held(n_jobs, n_scores):
    """Hold BLAS to one thread for a whole computation that uses our threads.

    OpenBLAS's own threads spin for a while after each multithreaded call;
    a BLAS call of the calling thread between two parallel searches would
    leave them spinning on the cores that the next search needs.  Nothing is
    held with one thread in all, or when searches of ``n_scores`` row-code
    pairs are too small to share (BLAS's threads then do the work).
    """
    if n_scores >= 2 * TASK_ELEMENTS and n_threads(n_jobs) > 1:
        with BLAS_HOLD:
            yield
    else:
        yield


@lru_cache(maxsize=1)
def n_cores():
    """The number of cores (asked once: ``os.cpu_count`` is not free)."""
    return os.cpu_count() or 1


def default_threads():
    """All cores, capped as threadpoolctl caps BLAS (``threadpool_limits``)."""
    return max(1, min([n_cores(), *BLAS_HOLD.limits()]))


def n_threads(n_jobs):
    """Threads for ``n_jobs``: None follows the BLAS limits, negative values
    count from all cores."""
    if n_jobs is None:
        return default_threads()
    if n_jobs < 0:
        return max(1, n_cores() + 1 + n_jobs)
    return max(1, n_jobs)


def task_threads(n_jobs, n_rows, min_task_rows):
    """Threads for ``n_rows`` rows cut into tasks of at least
    ``min_task_rows`` (see :func:`run_tasks`): 1 when they make one task,
    without reading the BLAS limits (1.5 us a read, a few reads in each
    stream step), else :func:`n_threads`."""
    if n_rows < 2 * max(1, min_task_rows):
        return 1
    return n_threads(n_jobs)


_POOL_LOCK = threading.Lock()
_POOL = {}


def thread_pool(n_threads):
    """A persistent pool: creating threads for every small call costs ~0.1 ms."""
    with _POOL_LOCK:
        pool = _POOL.get(n_threads)
        if pool is None:
            pool = _POOL[n_threads] = ThreadPoolExecutor(max_workers=n_threads)
        return pool


def run_tasks(func, n_rows, block_rows, n_threads, min_task_rows):
    """Call ``func(start, stop)`` on consecutive row ranges, in ``n_threads``.

    The rows are cut into at most ``2 * n_threads`` tasks (each at least
    ``min_task_rows`` rows, so that small calls stay in the calling thread),
    of whole blocks of ``block_rows`` when there are enough rows, handed to a
    persistent pool.  ``func`` writes into preallocated arrays, so the
    outcome does not depend on the threads.  While the pool works, BLAS is
    held to one thread per worker, which avoids oversubscribing the cores.
    """
    n_tasks = min(2 * n_threads, max(1, n_rows // max(1, min_task_rows)))
    if n_threads <= 1 or n_tasks <= 1:
        func(0, n_rows)
        return
    per_task = -(-n_rows // n_tasks)
    if per_task > block_rows:
        per_task = -(-per_task // block_rows) * block_rows
    bounds = [(s, min(s + per_task, n_rows)) for s in range(0, n_rows, per_task)]
    with BLAS_HOLD:
        pool = thread_pool(min(n_threads, len(bounds)))
        for future in [pool.submit(func, *b) for b in bounds]:
            future.result()


def working_memory_rows(row_bytes, n_rows, n_threads=1):
    """Rows whose temporaries, in each of ``n_threads``, fit ``working_memory``."""
    budget = get_config()["working_memory"] * 2**20 / max(1, n_threads)
    return int(max(1, min(n_rows, budget // max(1, row_bytes))))
