"""Resource monitoring of a block: memory, CPU, disk IO, threads and child processes.

:class:`ResourceMonitor` is a context manager. While its block runs, a
background thread (non-daemon, named ``actorflow-monitor-<name>``) samples the
current process and all of its children, recursively, with psutil every
``interval`` seconds; on exit the thread is stopped and joined at once, and
:meth:`ResourceMonitor.summary` reports the run::

    import actorflow as af

    with af.ResourceMonitor("heavy", store="runs.db") as mon:
        analysis.run(x)
    mon.summary()
    # {"name": "heavy", "elapsed_s": 3.2, "samples": 64, "peak_rss_mb": 812.4,
    #  "avg_rss_mb": 640.1, "cpu_percent_avg": 47.9, "cpu_percent_max": 50.0,
    #  "read_bytes": 0, "write_bytes": 52428800, "max_threads": 9, "max_children": 2, ...}

What one sample measures (process tree = this process and its live children):

- ``rss_mb``: resident memory of the process tree, in MiB (``peak_rss_mb`` is
  the largest sample: an allocation freed between two samples is not seen).
- ``cpu_percent``: CPU use of the process tree over the last interval,
  normalised for cores: 0-100 for the whole machine (psutil's per-process
  ``cpu_percent`` summed over the tree, divided by ``psutil.cpu_count()``).
- ``read_bytes`` / ``write_bytes``: bytes read from / written to storage since
  the block started (psutil ``io_counters`` deltas; a child's IO counts as last
  seen by a sample). Where the platform or permissions give no IO counters
  they stay 0 and ``summary()["io_available"]`` is False.
- ``threads``: threads of the process tree, not counting the monitor's own.
- ``children``: live child processes, recursively.

A process that vanishes between listing and reading (a child that just
exited) is skipped; a sample that fails as a whole is skipped and counted in
``summary()["skipped_samples"]``: sampling never stops the thread.

Persistence (``store=path``): one SQLite database, in WAL mode with a busy
timeout, so that several monitors (threads or processes) can share it. The
directory is created if missing; a store that cannot be opened raises
:class:`~actorflow.errors.StoreError` from ``__enter__``, before the block
runs. The schema is created on first use::

    CREATE TABLE IF NOT EXISTS monitor_runs (
        id              INTEGER PRIMARY KEY,
        name            TEXT NOT NULL,
        started_at      REAL NOT NULL,   -- unix time
        ended_at        REAL,            -- unix time; NULL while running (or if it crashed)
        elapsed_s       REAL,
        samples         INTEGER,
        peak_rss_mb     REAL,
        avg_rss_mb      REAL,
        cpu_percent_avg REAL,
        cpu_percent_max REAL,
        read_bytes      INTEGER,
        write_bytes     INTEGER,
        max_threads     INTEGER,
        max_children    INTEGER,
        summary_json    TEXT             -- the full summary() as JSON
    );
    CREATE TABLE IF NOT EXISTS monitor_samples (
        run_id          INTEGER NOT NULL REFERENCES monitor_runs(id),
        t               REAL NOT NULL,   -- seconds since the block started
        rss_mb          REAL NOT NULL,
        cpu_percent     REAL NOT NULL,
        read_bytes      INTEGER NOT NULL,  -- cumulative since the start
        write_bytes     INTEGER NOT NULL,  -- cumulative since the start
        threads         INTEGER NOT NULL,
        children        INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS monitor_samples_run ON monitor_samples(run_id, t);

The run row is inserted at ``__enter__`` and completed at exit; samples are
written in batches (every 50 samples, and the rest at exit), one transaction
per batch. The monitor's own writes to the store count in its process's
``write_bytes``. Query it like any SQLite file::

    con = sqlite3.connect("runs.db")
    con.execute("SELECT name, peak_rss_mb, cpu_percent_avg FROM monitor_runs").fetchall()
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psutil

from actorflow.errors import StoreError
from actorflow.observe.log import EventLog

__all__ = ["ResourceMonitor"]

_MB = 1024 * 1024
_BATCH = 50
_BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS monitor_runs (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL,
    started_at      REAL NOT NULL,
    ended_at        REAL,
    elapsed_s       REAL,
    samples         INTEGER,
    peak_rss_mb     REAL,
    avg_rss_mb      REAL,
    cpu_percent_avg REAL,
    cpu_percent_max REAL,
    read_bytes      INTEGER,
    write_bytes     INTEGER,
    max_threads     INTEGER,
    max_children    INTEGER,
    summary_json    TEXT
);
CREATE TABLE IF NOT EXISTS monitor_samples (
    run_id          INTEGER NOT NULL REFERENCES monitor_runs(id),
    t               REAL NOT NULL,
    rss_mb          REAL NOT NULL,
    cpu_percent     REAL NOT NULL,
    read_bytes      INTEGER NOT NULL,
    write_bytes     INTEGER NOT NULL,
    threads         INTEGER NOT NULL,
    children        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS monitor_samples_run ON monitor_samples(run_id, t);
"""

_RUN_COLUMNS = (
    "elapsed_s",
    "samples",
    "peak_rss_mb",
    "avg_rss_mb",
    "cpu_percent_avg",
    "cpu_percent_max",
    "read_bytes",
    "write_bytes",
    "max_threads",
    "max_children",
)

# One sample, as written to monitor_samples: (t, rss_mb, cpu_percent, read_bytes,
# write_bytes, threads, children). Plain tuples: built every interval.
_Sample = tuple[float, float, float, int, int, int, int]


class ResourceMonitor:
    """Measure the memory, CPU, disk IO, threads and children of a block of code.

    ``name`` labels the run (and the thread, ``actorflow-monitor-<name>``);
    ``store`` is an optional SQLite path where the run and its samples are
    saved (see the module docstring for the schema); ``interval`` is the time
    between samples, in seconds. Leaving the block stops and joins the
    sampling thread at once, whether the block returned or raised. A monitor
    can be entered again after it exited (each ``with`` is a new run), but not
    while it is running.

    Raises :class:`~actorflow.errors.StoreError` from ``__enter__`` when the
    store cannot be opened, and from ``__exit__`` when the samples could not be
    written (if the block itself raised, that error is kept and a note is
    added to it instead).

    Example::

        with af.ResourceMonitor("heavy", store="runs.db", interval=0.1) as mon:
            analysis.run(x)
            print(mon.summary()["peak_rss_mb"])   # a snapshot while running
        print(mon.summary())                      # the whole run
    """

    # Figures, guarded by _lock (the monitor thread writes them, summary() reads them).
    _started_at: float | None
    _ended_at: float | None
    _t0: float | None
    _t1: float | None
    # Sampling state: primed in __enter__, then touched only by the monitor thread.
    _proc: Any  # psutil.Process of this process
    _children: dict[Any, Any]
    _io_base: dict[Any, tuple[int, int]]
    _io_last: dict[Any, tuple[int, int]]
    _io_done: tuple[int, int]
    _fast_children: bool  # list children through /proc/<pid>/task/<tid>/children (Linux)
    _baseline_pids: set[int]  # descendants alive when the block began (not counted)
    # Store state: the monitor thread while it runs, __exit__ after it was joined.
    _pending: list[_Sample]
    _store_failure: sqlite3.Error | None

    def __init__(
        self,
        name: str,
        store: str | os.PathLike[str] | None = None,
        interval: float = 0.05,
    ) -> None:
        if not interval > 0:
            raise ValueError(
                f"ResourceMonitor {name!r}: interval must be a positive number of seconds, "
                f"got {interval!r}"
            )
        self.name = name
        self.store: Path | None = None if store is None else Path(os.fspath(store)).expanduser()
        self.interval = float(interval)
        self._log = EventLog(monitor=name)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._run_id: int | None = None
        self._cpu_count = psutil.cpu_count() or 1
        self._reset()

    # -- public API -----------------------------------------------------------------------

    @property
    def store_run_id(self) -> int | None:
        """The ``monitor_runs.id`` of the current (or last) run; None without a store.

        Example::

            with af.ResourceMonitor("etl", store="runs.db") as mon:
                ...
            con.execute("SELECT * FROM monitor_samples WHERE run_id = ?", (mon.store_run_id,))
        """
        return self._run_id

    def summary(self) -> dict[str, Any]:
        """Return the run's figures as a JSON-ready dict: final after the block, a snapshot during.

        Keys: ``name``, ``elapsed_s``, ``samples``, ``peak_rss_mb``,
        ``avg_rss_mb``, ``last_rss_mb``, ``cpu_percent_avg``,
        ``cpu_percent_max`` (0-100 for the whole machine), ``read_bytes``,
        ``write_bytes`` (since the start), ``max_threads``, ``max_children``
        (processes started during the block; descendants alive before it, such
        as multiprocessing's interpreter-wide forkserver, are measured in RSS
        and CPU but not counted),
        ``started_at`` / ``ended_at`` (unix time; ``ended_at`` is None while
        running), ``running``, ``io_available``, ``skipped_samples``,
        ``cpu_count``, ``interval``. Before the first ``with`` every figure is 0.

        Example::

            with af.ResourceMonitor("train") as mon:
                model.fit(data)
            s = mon.summary()
            print(f"{s['peak_rss_mb']:.0f} MB peak, {s['cpu_percent_avg']:.0f}% CPU")
        """
        with self._lock:
            n = self._samples
            if self._t0 is None:
                elapsed = 0.0
            elif self._t1 is None:
                elapsed = time.monotonic() - self._t0
            else:
                elapsed = self._t1 - self._t0
            return {
                "name": self.name,
                "elapsed_s": round(elapsed, 6),
                "samples": n,
                "peak_rss_mb": round(self._peak_rss_mb, 3),
                "avg_rss_mb": round(self._rss_sum / n, 3) if n else 0.0,
                "last_rss_mb": round(self._last_rss_mb, 3),
                "cpu_percent_avg": round(self._cpu_sum / n, 2) if n else 0.0,
                "cpu_percent_max": round(self._cpu_max, 2),
                "read_bytes": self._read_bytes,
                "write_bytes": self._write_bytes,
                "max_threads": self._max_threads,
                "max_children": self._max_children,
                "started_at": self._started_at,
                "ended_at": self._ended_at,
                "running": self._t0 is not None and self._t1 is None,
                "io_available": self._io_available,
                "skipped_samples": self._skipped,
                "cpu_count": self._cpu_count,
                "interval": self.interval,
            }

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "idle"
        return f"<ResourceMonitor {self.name!r} {state} samples={self._samples}>"

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._thread is not None:
            raise RuntimeError(
                f"ResourceMonitor {self.name!r} is already running; "
                "use a separate ResourceMonitor for a nested block"
            )
        self._reset()
        self._stop.clear()
        started_at = time.time()
        if self.store is not None:
            self._open_store(self.store, started_at)  # fail fast, before the block runs
        thread = threading.Thread(
            target=self._loop, name=f"actorflow-monitor-{self.name}", daemon=False
        )
        try:
            self._prime()
            with self._lock:
                self._started_at = started_at
                self._t0 = time.monotonic()
            thread.start()
        except BaseException:
            self._close_store()
            raise
        self._thread = thread
        self._log.debug("monitor_started", store=None if self.store is None else str(self.store))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()  # the loop wakes at once; it takes one last sample and ends
        with self._lock:
            self._t1 = time.monotonic()
            self._ended_at = time.time()
        summary = self.summary()
        try:
            self._finish_store(summary)
        except StoreError as error:
            if exc is None:
                raise
            exc.add_note(f"also, ResourceMonitor {self.name!r} lost its samples: {error}")
            self._log.warning("monitor_store_failed", error=str(error))
        finally:
            self._close_store()
        self._log.info(
            "monitor_finished",
            elapsed_s=summary["elapsed_s"],
            samples=summary["samples"],
            peak_rss_mb=summary["peak_rss_mb"],
            cpu_percent_avg=summary["cpu_percent_avg"],
        )

    # -- sampling (monitor thread) --------------------------------------------------------

    def _reset(self) -> None:
        with self._lock:
            self._started_at = None
            self._ended_at = None
            self._t0 = None
            self._t1 = None
            self._samples = 0
            self._skipped = 0
            self._rss_sum = 0.0
            self._peak_rss_mb = 0.0
            self._last_rss_mb = 0.0
            self._cpu_sum = 0.0
            self._cpu_max = 0.0
            self._read_bytes = 0
            self._write_bytes = 0
            self._max_threads = 0
            self._max_children = 0
            self._io_available = hasattr(psutil.Process, "io_counters")
        self._run_id = None
        self._pending = []
        self._store_failure = None
        # Only the monitor thread touches these once it runs (primed before it starts).
        self._proc = None
        self._children = {}  # psutil.Process -> the same, primed for cpu_percent
        self._io_base = {}  # counters when first seen
        self._io_last = {}  # counters at the last sample
        self._io_done = (0, 0)  # IO of children that have exited, as last seen
        self._fast_children = False
        self._baseline_pids = set()

    def _prime(self) -> None:
        """Take the baselines: cpu_percent's first call, IO counters of existing processes."""
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        self._read_io(self._proc, new=False)
        pid = self._proc.pid
        self._fast_children = os.path.exists(f"/proc/{pid}/task/{pid}/children")
        existing = self._list_children()
        # descendants alive before the block (multiprocessing's interpreter-wide
        # forkserver and resource tracker, say) are measured but not counted as
        # children of the work
        self._baseline_pids = {child.pid for child in existing}
        for child in existing:
            try:
                child.cpu_percent(None)
            except psutil.Error:
                continue
            self._children[child] = child
            self._read_io(child, new=False)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_safely()
            if self._conn is not None and len(self._pending) >= _BATCH:
                self._flush_in_thread()
        self._sample_safely()  # a last one, so that a block shorter than interval is measured

    def _sample_safely(self) -> None:
        try:
            sample = self._sample()
        except Exception as exc:  # never let sampling end the thread
            with self._lock:
                self._skipped += 1
            self._log.debug("monitor_sample_skipped", error=f"{type(exc).__name__}: {exc}")
            return
        _t, rss_mb, cpu, read_bytes, write_bytes, threads, children = sample
        with self._lock:
            self._samples += 1
            self._rss_sum += rss_mb
            self._last_rss_mb = rss_mb
            self._peak_rss_mb = max(self._peak_rss_mb, rss_mb)
            self._cpu_sum += cpu
            self._cpu_max = max(self._cpu_max, cpu)
            self._read_bytes = read_bytes
            self._write_bytes = write_bytes
            self._max_threads = max(self._max_threads, threads)
            self._max_children = max(self._max_children, children)
        if self._conn is not None:
            self._pending.append(sample)

    def _sample(self) -> _Sample:
        t0 = self._t0
        assert t0 is not None
        root = self._proc
        with root.oneshot():
            rss = int(root.memory_info().rss)
            cpu = float(root.cpu_percent(None))
            threads = int(root.num_threads()) - 1  # not counting this monitor thread
        self._read_io(root, new=False)
        listed = self._list_children()
        alive: dict[Any, Any] = {}
        for found in listed:
            known = self._children.get(found)
            proc = found if known is None else known
            try:
                with proc.oneshot():
                    child_rss = int(proc.memory_info().rss)
                    child_cpu = float(proc.cpu_percent(None))  # 0.0 on the first call
                    child_threads = int(proc.num_threads())
            except psutil.Error:  # exited since it was listed, zombie, or access denied
                continue
            alive[proc] = proc
            rss += child_rss
            cpu += child_cpu
            threads += child_threads
            self._read_io(proc, new=known is None)
        self._forget_exited(alive)
        read_bytes, write_bytes = self._io_totals()
        cpu = min(max(cpu / self._cpu_count, 0.0), 100.0)
        return (
            round(time.monotonic() - t0, 6),
            rss / _MB,
            cpu,
            read_bytes,
            write_bytes,
            threads,
            sum(1 for proc in alive if proc.pid not in self._baseline_pids),
        )

    def _list_children(self) -> list[Any]:
        """The live descendants of this process, as psutil.Process objects."""
        if self._fast_children:
            try:
                pids = _descendant_pids(self._proc.pid)
            except OSError:
                self._fast_children = False
            else:
                listed = []
                for pid in pids:
                    try:
                        listed.append(psutil.Process(pid))
                    except psutil.Error:  # exited since it was listed
                        continue
                return listed
        try:
            return list(self._proc.children(recursive=True))
        except psutil.Error:
            return []

    def _read_io(self, proc: Any, *, new: bool) -> None:
        """Record ``proc``'s IO counters; a child first seen after the start counts from 0."""
        if not self._io_available:
            return
        try:
            io = proc.io_counters()
            counters = (int(io.read_bytes), int(io.write_bytes))
        except (psutil.Error, OSError, AttributeError, NotImplementedError):
            if proc is self._proc:
                with self._lock:
                    self._io_available = False
            return
        if proc not in self._io_base:
            self._io_base[proc] = (0, 0) if new else counters
        self._io_last[proc] = counters

    def _forget_exited(self, alive: dict[Any, Any]) -> None:
        """Keep the live children; fold the IO of the exited ones into ``_io_done``."""
        self._children = alive
        for proc in list(self._io_last):
            if proc is self._proc or proc in alive:
                continue
            base, last = self._io_base.pop(proc), self._io_last.pop(proc)
            self._io_done = (
                self._io_done[0] + max(last[0] - base[0], 0),
                self._io_done[1] + max(last[1] - base[1], 0),
            )

    def _io_totals(self) -> tuple[int, int]:
        read, write = self._io_done
        for proc, last in self._io_last.items():
            base = self._io_base[proc]
            read += max(last[0] - base[0], 0)
            write += max(last[1] - base[1], 0)
        return read, write

    # -- store ----------------------------------------------------------------------------

    def _open_store(self, path: Path, started_at: float) -> None:
        conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Used by the monitor thread while it runs and by __exit__ after it was
            # joined: never by two threads at once.
            conn = sqlite3.connect(str(path), timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.executescript(_SCHEMA)
            with conn:
                cursor = conn.execute(
                    "INSERT INTO monitor_runs (name, started_at) VALUES (?, ?)",
                    (self.name, started_at),
                )
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            raise StoreError(
                f"ResourceMonitor {self.name!r} cannot open its store {str(path)!r}: "
                f"{type(exc).__name__}: {exc}; pass store= a file path in a writable "
                "directory (it is created if missing), or store=None to keep the summary "
                "in memory only"
            ) from exc
        self._conn = conn
        self._run_id = cursor.lastrowid

    def _write_samples(self, conn: sqlite3.Connection) -> None:
        if not self._pending:
            return
        with conn:  # one transaction per batch
            conn.executemany(
                "INSERT INTO monitor_samples (run_id, t, rss_mb, cpu_percent, read_bytes,"
                " write_bytes, threads, children) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(self._run_id, *sample) for sample in self._pending],
            )
        self._pending.clear()

    def _flush_in_thread(self) -> None:
        conn = self._conn
        if conn is None or self._store_failure is not None:
            self._pending.clear()
            return
        try:
            self._write_samples(conn)
        except sqlite3.Error as exc:  # reported by __exit__, in the caller's thread
            self._store_failure = exc
            self._pending.clear()

    def _finish_store(self, summary: dict[str, Any]) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            if self._store_failure is not None:
                raise self._store_failure
            self._write_samples(conn)
            assignments = ", ".join(f"{column} = ?" for column in _RUN_COLUMNS)
            with conn:
                conn.execute(
                    f"UPDATE monitor_runs SET ended_at = ?, {assignments}, summary_json = ?"
                    " WHERE id = ?",
                    (
                        summary["ended_at"],
                        *(summary[column] for column in _RUN_COLUMNS),
                        json.dumps(summary),
                        self._run_id,
                    ),
                )
        except sqlite3.Error as exc:
            raise StoreError(
                f"ResourceMonitor {self.name!r} could not write to its store "
                f"{str(self.store)!r}: {type(exc).__name__}: {exc}; check that the disk is "
                "not full and that no other program holds a long write lock on the file"
            ) from exc

    def _close_store(self) -> None:
        conn, self._conn = self._conn, None
        self._pending.clear()
        if conn is not None:
            conn.close()


def _descendant_pids(pid: int) -> list[int]:
    """Pids of the descendants of ``pid``, read from Linux's ``/proc/<pid>/task/<tid>/children``.

    Much cheaper than ``psutil.Process.children(recursive=True)``, which reads
    the status of every process on the machine; raises OSError where the
    interface is missing for ``pid`` itself. A descendant that exits while it
    is being read is skipped (as are its own children, for this sample).
    """
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            if parent == pid:
                raise
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as file:
                    children = [int(field) for field in file.read().split()]
            except FileNotFoundError:  # the thread (or the process) ended
                continue
            except OSError:  # e.g. a child that changed user: skip it, unless it is us
                if parent == pid:
                    raise
                continue
            found.extend(children)
            todo.extend(children)
    return found
