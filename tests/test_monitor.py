"""ResourceMonitor: real psutil figures, a real SQLite store, a thread that never outlives it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from actorflow.errors import StoreError
from actorflow.observe import monitor as monitor_module
from actorflow.observe.monitor import ResourceMonitor
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("actorflow-monitor-")]


def wait_for_more_samples(mon: ResourceMonitor, n: int = 2) -> None:
    """Wait until the monitor has taken ``n`` samples after this call."""
    target = mon.summary()["samples"] + n
    wait_until(lambda: mon.summary()["samples"] >= target)


def spin(seconds: float) -> int:
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        count += 1
    return count


def filesystem_type(path: Path) -> str:
    best = ""
    fstype = ""
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and len(part.mountpoint) > len(best):
            best, fstype = part.mountpoint, part.fstype
    return fstype


def connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=10)


# -- figures --------------------------------------------------------------------------------


def test_peak_rss_grows_when_the_block_allocates_memory() -> None:
    with ResourceMonitor("alloc", interval=0.01) as mon:
        wait_for_more_samples(mon)
        before = mon.summary()["peak_rss_mb"]
        block = bytearray(b"\x01") * (50 * MB)  # written, so its pages are resident
        wait_for_more_samples(mon)
        del block
    summary = mon.summary()
    assert summary["peak_rss_mb"] >= before + 40
    assert 0 < summary["avg_rss_mb"] <= summary["peak_rss_mb"]


def test_cpu_percent_rises_under_cpu_work() -> None:
    with ResourceMonitor("spin", interval=0.02) as mon:
        spin(0.3)
    summary = mon.summary()
    assert summary["samples"] >= 1
    assert summary["cpu_percent_avg"] > 0
    assert 0 < summary["cpu_percent_max"] <= 100
    assert summary["cpu_percent_avg"] <= summary["cpu_percent_max"]


def test_write_bytes_grow_when_the_block_writes_and_fsyncs_a_file(tmp_path: Path) -> None:
    if filesystem_type(tmp_path) in {"tmpfs", "ramfs"}:
        pytest.skip(f"{tmp_path} is in memory: the kernel counts no storage writes there")
    with ResourceMonitor("write") as mon:
        with open(tmp_path / "data.bin", "wb") as f:
            for _ in range(8):
                f.write(os.urandom(MB))
            f.flush()
            os.fsync(f.fileno())
    summary = mon.summary()
    if not summary["io_available"]:
        pytest.skip("this platform gives no IO counters for the process")
    assert summary["write_bytes"] >= 7 * MB
    assert summary["read_bytes"] >= 0


def test_child_processes_are_counted() -> None:
    with ResourceMonitor("children", interval=0.01) as mon:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
        try:
            wait_until(lambda: mon.summary()["max_children"] >= 1)
        finally:
            child.terminate()
            child.wait()
    summary = mon.summary()
    assert summary["max_children"] == 1
    assert summary["max_threads"] >= 2  # the main thread and the child's


@pytest.mark.parametrize("listing", ["proc_children_files", "psutil_fallback"])
def test_grandchildren_are_counted_too(monkeypatch: pytest.MonkeyPatch, listing: str) -> None:
    if listing == "psutil_fallback":

        def unavailable(pid: int) -> list[int]:
            raise FileNotFoundError(f"/proc/{pid}/task")

        monkeypatch.setattr(monitor_module, "_descendant_pids", unavailable)
    # the grandchild inherits the child's stdin: closing our end ends both
    script = (
        "import subprocess, sys\n"
        "subprocess.run([sys.executable, '-c', 'import sys; sys.stdin.read()'])\n"
    )
    with ResourceMonitor("tree", interval=0.01) as mon:
        child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
        assert child.stdin is not None
        try:
            wait_until(lambda: mon.summary()["max_children"] >= 2)
        finally:
            child.stdin.close()
            child.wait()
    assert mon.summary()["max_children"] == 2


def test_io_of_child_processes_is_included(tmp_path: Path) -> None:
    if filesystem_type(tmp_path) in {"tmpfs", "ramfs"}:
        pytest.skip(f"{tmp_path} is in memory: the kernel counts no storage writes there")
    script = (
        "import os, sys\n"
        f"with open({str(tmp_path / 'child.bin')!r}, 'wb') as f:\n"
        "    f.write(os.urandom(4 << 20)); f.flush(); os.fsync(f.fileno())\n"
        "print('written', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with ResourceMonitor("child-io", interval=0.01) as mon:
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            assert child.stdout.readline() == b"written\n"
            if not mon.summary()["io_available"]:
                pytest.skip("this platform gives no IO counters for the process")
            wait_until(lambda: mon.summary()["write_bytes"] >= 4 * MB)
        finally:
            child.stdin.close()
            child.wait()
            child.stdout.close()
    # the child has exited: what it wrote still counts
    assert mon.summary()["write_bytes"] >= 4 * MB


def test_children_that_exit_between_samples_never_stop_the_sampling() -> None:
    with ResourceMonitor("churn", interval=0.001) as mon:
        for _ in range(8):
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        wait_for_more_samples(mon, 3)
        (thread,) = monitor_threads()
        assert thread.is_alive()
    assert mon.summary()["samples"] >= 3


# -- lifecycle ------------------------------------------------------------------------------


def test_the_sampling_thread_is_named_non_daemon_and_gone_after_exit() -> None:
    with ResourceMonitor("life") as mon:
        (thread,) = monitor_threads()
        assert thread.name == "actorflow-monitor-life"
        assert not thread.daemon
    assert not thread.is_alive()
    assert monitor_threads() == []
    assert mon.summary()["running"] is False


def test_the_thread_is_joined_when_the_block_raises() -> None:
    with pytest.raises(ZeroDivisionError), ResourceMonitor("boom"):
        1 / 0
    assert monitor_threads() == []


def test_exit_is_immediate_even_with_a_long_interval() -> None:
    start = time.monotonic()
    with ResourceMonitor("slow", interval=30) as mon:
        pass
    assert time.monotonic() - start < 5
    assert mon.summary()["samples"] == 1  # the last sample, taken at exit


def test_summary_is_a_snapshot_while_running_and_final_after() -> None:
    mon = ResourceMonitor("snap", interval=0.01)
    assert mon.summary()["samples"] == 0
    with mon:
        wait_for_more_samples(mon, 2)
        during = mon.summary()
        assert during["running"] is True
        assert during["ended_at"] is None
        assert during["samples"] >= 2
        assert during["peak_rss_mb"] > 0
        assert during["elapsed_s"] > 0
    after = mon.summary()
    assert after["running"] is False
    assert after["ended_at"] >= after["started_at"]
    assert after["samples"] >= during["samples"]
    assert after["elapsed_s"] >= during["elapsed_s"]
    assert mon.summary() == after  # final: no longer moves
    required = {
        "name",
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
    }
    assert required <= after.keys()
    json.dumps(after)


def test_a_running_monitor_cannot_be_entered_again_but_can_be_reused_after() -> None:
    mon = ResourceMonitor("twice", interval=0.01)
    with mon:
        with pytest.raises(RuntimeError, match="'twice' is already running"):
            mon.__enter__()
    first = mon.summary()
    with mon:
        pass
    second = mon.summary()
    assert second["started_at"] > first["started_at"]
    assert monitor_threads() == []


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval must be a positive number"):
        ResourceMonitor("bad", interval=0)


# -- store ----------------------------------------------------------------------------------


def test_store_holds_the_run_row_and_its_samples_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "nested" / "dir" / "runs.db"  # the directory is created
    with ResourceMonitor("stored", store=db, interval=0.01) as mon:
        wait_for_more_samples(mon, 3)
    summary = mon.summary()
    with connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        row = con.execute(
            "SELECT id, name, started_at, ended_at, samples, peak_rss_mb, max_threads,"
            " summary_json FROM monitor_runs"
        ).fetchall()
        assert len(row) == 1
        run_id, name, started_at, ended_at, samples, peak, max_threads, blob = row[0]
        assert run_id == mon.store_run_id
        assert name == "stored"
        assert started_at == summary["started_at"]
        assert ended_at == summary["ended_at"]
        assert samples == summary["samples"] >= 4
        assert peak == summary["peak_rss_mb"]
        assert max_threads == summary["max_threads"]
        assert json.loads(blob) == summary
        points = con.execute(
            "SELECT t, rss_mb, cpu_percent, read_bytes, write_bytes, threads, children"
            " FROM monitor_samples WHERE run_id = ? ORDER BY t",
            (run_id,),
        ).fetchall()
    con.close()
    assert len(points) == summary["samples"]
    times = [p[0] for p in points]
    assert times == sorted(times)
    assert 0 < times[0] <= times[-1] <= summary["elapsed_s"]
    assert max(p[1] for p in points) == pytest.approx(summary["peak_rss_mb"], abs=0.001)
    assert all(0 <= p[2] <= 100 for p in points)


def test_samples_are_written_in_batches_while_running(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    con = connect(db)
    try:
        with ResourceMonitor("batches", store=db, interval=0.001) as mon:

            def stored() -> int:
                (n,) = con.execute("SELECT count(*) FROM monitor_samples").fetchone()
                assert n % 50 == 0, f"{n} samples stored: not a whole number of batches"
                return int(n)

            wait_until(lambda: stored() >= 50)
            assert stored() <= mon.summary()["samples"]
        (n,) = con.execute("SELECT count(*) FROM monitor_samples").fetchone()
        assert n == mon.summary()["samples"]
    finally:
        con.close()


def test_two_monitors_write_to_one_database(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    with ResourceMonitor("outer", store=db, interval=0.001) as outer:
        with ResourceMonitor("inner", store=db, interval=0.001) as inner:
            wait_until(lambda: min(outer.summary()["samples"], inner.summary()["samples"]) > 60)
    with connect(db) as con:
        runs = con.execute("SELECT id, name, samples FROM monitor_runs ORDER BY id").fetchall()
        counts = dict(
            con.execute("SELECT run_id, count(*) FROM monitor_samples GROUP BY run_id").fetchall()
        )
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()
    assert runs == [
        (outer.store_run_id, "outer", outer.summary()["samples"]),
        (inner.store_run_id, "inner", inner.summary()["samples"]),
    ]
    assert counts == {
        outer.store_run_id: outer.summary()["samples"],
        inner.store_run_id: inner.summary()["samples"],
    }


@pytest.mark.parametrize("block_raises", [False, True])
def test_a_store_that_cannot_be_written_during_the_run_is_reported_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_raises: bool
) -> None:
    monkeypatch.setattr(monitor_module, "_BUSY_TIMEOUT_S", 0.05)
    db = tmp_path / "locked.db"
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        with pytest.raises(StoreError if not block_raises else KeyError) as info:
            with ResourceMonitor("locked", store=db, interval=0.001) as mon:
                locker.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
                wait_until(lambda: mon.summary()["samples"] >= 60)  # a batch was tried
                (thread,) = monitor_threads()
                assert thread.is_alive()  # the failure did not end the sampling
                locker.execute("ROLLBACK")
                if block_raises:
                    raise KeyError("the user's own error")
    finally:
        locker.close()
    if block_raises:
        (note,) = info.value.__notes__
        assert "'locked' lost its samples" in note
    else:
        assert repr(str(db)) in str(info.value)
        assert "database is locked" in str(info.value)
    assert monitor_threads() == []


def unwritable_paths(tmp_path: Path) -> dict[str, Path]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    return {
        "proc": Path("/proc/forbidden/x.db"),
        "parent_is_a_file": a_file / "x.db",
        "path_is_a_directory": tmp_path,
    }


@pytest.mark.parametrize("case", ["proc", "parent_is_a_file", "path_is_a_directory"])
def test_an_unwritable_store_raises_store_error_before_the_block_runs(
    tmp_path: Path, case: str
) -> None:
    path = unwritable_paths(tmp_path)[case]
    ran = False
    with pytest.raises(StoreError) as info:
        with ResourceMonitor("nowhere", store=path):
            ran = True
    message = str(info.value)
    assert repr(str(path)) in message
    assert "'nowhere'" in message
    assert "writable directory" in message
    assert not ran
    assert monitor_threads() == []
