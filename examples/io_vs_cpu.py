"""IO-bound steps on threads, CPU-bound steps on worker processes, under a ResourceMonitor.

A pipeline library's tutorial tells two kinds of parallel steps apart:

    ThreadPoolExecutor (IO-bound): API calls, database queries, file operations.
    ProcessPoolExecutor (CPU-bound): heavy calculations, data transformations
    that bypass the Python GIL.

and watches a heavy run with a resource monitor::

    with ResourceMonitor("Heavy_Process") as monitor:
        pipeline.run(large_dataset)
    stats = monitor.get_summary()

This example does the same with actorflow. For every log file:

- ``fetch_log`` (IO-bound, a thread task, the default): waits ``LATENCY_S`` seconds,
  as a download from object storage would, then reads the file. A blocking call
  releases the GIL, so the fetches of all the files wait at the same time.
- ``score_log`` (CPU-bound, ``executor="process"``): parses every line into a
  template (numbers masked), counts templates and error lines, and fingerprints
  every line with a pure-Python hash over ``ROUNDS`` rounds. A pure-Python loop
  holds the GIL: on threads the scores would take turns, on the run's worker
  processes (``processes=`` on ``run``) they use several cores.
- ``summarize`` (a thread task) gathers every score into one report.

The logs are the loghub samples in ``../shared/data/loghub`` when they are at hand,
else a few generated logs. The run is wrapped in ``af.ResourceMonitor``; the example
prints each step with its executor, the process it ran in and its own duration,
then the elapsed time against the sum of the step times (what running the steps
one after another would take), and the monitor's summary (peak RSS, CPU, IO,
threads, child processes).

Process tasks need an import-safe script: the work is in ``main()``, under
``if __name__ == "__main__":``. Run it with ``python examples/io_vs_cpu.py``.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import actorflow as af

LOGHUB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "loghub"
LATENCY_S = 0.2  # simulated network latency of every fetch
ROUNDS = 6  # fingerprint rounds per line: about 0.1-0.3 s of pure Python per 2k-line log
PROCESSES = 2  # worker processes of the run
ERROR_WORDS = ("error", "fail", "fatal", "exception", "denied", "refused", "invalid")
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


# --- the steps ---------------------------------------------------------------------------


@af.task
def fetch_log(path: str, latency_s: float) -> dict[str, Any]:
    """IO-bound: wait ``latency_s`` (a remote store), then read the log; time the step."""
    started = time.perf_counter()
    time.sleep(latency_s)
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return {
        "source": Path(path).name,
        "text": text,
        "step": _step_record(started),
    }


def template_of(line: str) -> str:
    """The line with every token holding a digit masked as ``<*>`` (a crude log template)."""
    return " ".join("<*>" if any(ch.isdigit() for ch in token) else token for token in line.split())


def fingerprint(text: str, rounds: int) -> int:
    """A 64-bit FNV-1a hash of ``text``, chained over ``rounds`` rounds, in pure Python."""
    h = 0xCBF29CE484222325
    for r in range(rounds):
        h ^= r
        for ch in text:
            h = ((h ^ ord(ch)) * _FNV_PRIME) & _MASK
    return h


@af.task(executor="process")
def score_log(fetched: dict[str, Any], rounds: int) -> dict[str, Any]:
    """CPU-bound: templates, error lines and a fingerprint of every line; time the step."""
    started = time.perf_counter()
    counts: dict[str, int] = {}
    errors = 0
    checksum = 0
    lines = fetched["text"].splitlines()
    for line in lines:
        template = template_of(line)
        counts[template] = counts.get(template, 0) + 1
        lowered = line.lower()
        if any(word in lowered for word in ERROR_WORDS):
            errors += 1
        checksum ^= fingerprint(template, rounds)
    top_template, top_count = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    return {
        "source": fetched["source"],
        "lines": len(lines),
        "templates": len(counts),
        "error_lines": errors,
        "top_template": top_template,
        "top_count": top_count,
        "checksum": f"{checksum:016x}",
        "fetch_step": fetched["step"],
        "step": _step_record(started),
    }


@af.task
def summarize(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Gather every log's score into one report, in the order of the sources."""
    return {
        "sources": [s["source"] for s in scores],
        "lines": sum(s["lines"] for s in scores),
        "error_lines": sum(s["error_lines"] for s in scores),
        "scores": scores,
    }


def _step_record(started: float) -> dict[str, Any]:
    """Where and how long a step ran: duration, wall-clock span (any process), pid, thread."""
    seconds = time.perf_counter() - started
    ended_at = time.time()
    return {
        "seconds": seconds,
        "span": (ended_at - seconds, ended_at),
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
    }


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` spans in progress at the same moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    peak = current = 0
    for _, delta in events:  # at equal times an end (-1) sorts before a start (+1)
        current += delta
        peak = max(peak, current)
    return peak


def build_flow(paths: list[Path], latency_s: float = LATENCY_S, rounds: int = ROUNDS) -> af.Flow:
    """One fetch -> score chain per log (all independent), gathered by summarize."""

    @af.flow
    def io_vs_cpu() -> dict[str, Any]:
        # a fetch and a score per file: the fetches (threads) block at the same time, the
        # scores (processes) start as soon as their file has arrived and a worker is free
        return summarize([score_log(fetch_log(str(p), latency_s), rounds) for p in paths])

    return io_vs_cpu


# --- data --------------------------------------------------------------------------------


def generate_logs(
    directory: Path, services: int = 4, lines: int = 2000, seed: int = 7
) -> list[Path]:
    """Write ``services`` synthetic logs of ``lines`` lines each; return their paths."""
    rng = random.Random(seed)
    messages = (
        "GET /api/v1/orders/{n} 200 in {ms} ms",
        "user {n} logged in from 10.0.{a}.{b}",
        "cache miss for key session:{n}",
        "connection refused by 10.0.{a}.{b}:5432, retry {r}",
        "ERROR timeout after {ms} ms talking to payments",
        "worker {r} finished batch {n}",
    )
    paths = []
    for s in range(services):
        path = directory / f"service_{s + 1}.log"
        with path.open("w", encoding="utf-8") as out:
            for i in range(lines):
                message = rng.choice(messages).format(
                    n=rng.randint(1, 99_999),
                    ms=rng.randint(1, 3000),
                    a=rng.randint(0, 255),
                    b=rng.randint(1, 254),
                    r=rng.randint(1, 8),
                )
                out.write(f"2024-05-01 12:{i // 60 % 60:02d}:{i % 60:02d} svc{s + 1} {message}\n")
        paths.append(path)
    return paths


def loghub_logs(directory: Path = LOGHUB) -> list[Path]:
    """The loghub ``*_2k.log`` samples in ``directory``, sorted; empty if there are none."""
    return sorted(directory.glob("*_2k.log")) if directory.is_dir() else []


# --- main ----------------------------------------------------------------------------------


def run(
    paths: list[Path],
    latency_s: float = LATENCY_S,
    rounds: int = ROUNDS,
    processes: int = PROCESSES,
) -> dict[str, Any]:
    """Run the flow over ``paths`` under a ResourceMonitor; print and return what happened."""
    flow = build_flow(paths, latency_s, rounds)
    with af.ResourceMonitor("io_vs_cpu", interval=0.05) as monitor:
        started = time.perf_counter()
        report = flow.run(processes=processes)
        elapsed = time.perf_counter() - started
    usage = monitor.summary()

    parent = os.getpid()
    steps = []
    for score in report["scores"]:
        steps.append(("fetch_log", fetch_log.executor, score["source"], score["fetch_step"]))
        steps.append(("score_log", score_log.executor, score["source"], score["step"]))
    print(f"{'step':<10} {'executor':<8} {'log':<22} {'ran in':<16} {'seconds':>7}")
    for name, executor, source, step in steps:
        where = "parent" if step["pid"] == parent else f"worker {step['pid']}"
        print(f"{name:<10} {executor:<8} {source:<22} {where:<16} {step['seconds']:7.2f}")
    io_s = sum(step["seconds"] for name, _, _, step in steps if name == "fetch_log")
    cpu_s = sum(step["seconds"] for name, _, _, step in steps if name == "score_log")
    step_sum = io_s + cpu_s
    io_pids = {step["pid"] for name, _, _, step in steps if name == "fetch_log"}
    cpu_pids = {step["pid"] for name, _, _, step in steps if name == "score_log"}
    io_overlap = max_overlap([step["span"] for name, _, _, step in steps if name == "fetch_log"])
    cpu_overlap = max_overlap([step["span"] for name, _, _, step in steps if name == "score_log"])

    print(
        f"\n{len(steps)} steps over {len(paths)} logs, {report['lines']:,} lines, "
        f"{report['error_lines']:,} error lines"
    )
    print(
        f"  IO-bound steps  (thread):  {io_s:6.2f} s in total, in the parent process, "
        f"at most {io_overlap} at once"
    )
    print(
        f"  CPU-bound steps (process): {cpu_s:6.2f} s in total, "
        f"in {len(cpu_pids)} worker process(es) (processes={processes}), "
        f"at most {cpu_overlap} at once"
    )
    print(f"  sum of the step times:     {step_sum:6.2f} s (one after another)")
    print(
        f"  elapsed:                   {elapsed:6.2f} s "
        f"({step_sum / elapsed:.1f}x faster than the steps one after another)"
    )
    print(
        f"  IO steps in the parent: {io_pids == {parent}}; "
        f"CPU steps outside the parent: {parent not in cpu_pids}"
    )
    print("\nResourceMonitor summary:")
    print(
        f"  peak RSS {usage['peak_rss_mb']:.1f} MB (average {usage['avg_rss_mb']:.1f} MB), "
        f"CPU {usage['cpu_percent_avg']:.1f}% average / {usage['cpu_percent_max']:.1f}% peak "
        f"of {usage['cpu_count']} cores"
    )
    print(
        f"  storage IO: read {usage['read_bytes']:,} B, written {usage['write_bytes']:,} B "
        f"(files in the page cache are read without storage IO)"
    )
    print(
        f"  max threads {usage['max_threads']}, max child processes {usage['max_children']}, "
        f"{usage['samples']} samples in {usage['elapsed_s']:.2f} s"
    )
    return {
        "report": report,
        "elapsed_s": elapsed,
        "io_s": io_s,
        "cpu_s": cpu_s,
        "step_sum_s": step_sum,
        "io_pids": io_pids,
        "cpu_pids": cpu_pids,
        "io_overlap": io_overlap,
        "cpu_overlap": cpu_overlap,
        "usage": usage,
    }


def main(log_dir: Path | None = None) -> dict[str, Any]:
    """Run over ``log_dir``'s ``*_2k.log`` files, the loghub samples, or generated logs."""
    paths = loghub_logs(LOGHUB if log_dir is None else log_dir)
    if paths:
        print(f"IO vs CPU over {len(paths)} loghub logs in {paths[0].parent.resolve()}\n")
        return run(paths)
    with tempfile.TemporaryDirectory(prefix="actorflow-io-vs-cpu-") as tmp:
        paths = generate_logs(Path(tmp))
        print(f"IO vs CPU over {len(paths)} generated logs (loghub is not at hand)\n")
        return run(paths)


if __name__ == "__main__":
    main()
