"""CPU-bound fan-out: the same chunks of pure-Python work, sequentially and on processes.

A pipeline library's tutorial runs CPU-heavy steps in a process pool, to bypass
the GIL::

    Parallel(steps=[heavy_math_1, heavy_math_2], use_processes=True, max_workers=2)

With actorflow a CPU-bound task is declared ``@af.task(executor="process")``: its
calls run in the running graph's worker processes, shared by all its process tasks
and sized by ``processes=`` on ``run`` / ``start``. Here one flow fans a range of
integers out into ``N_CHUNKS`` chunks, each chunk a ``crunch`` node (Collatz
sequence lengths, a pure-Python loop that holds the GIL all the time, about a
quarter of a second per chunk), and gathers the results into one summary.

The example runs the same chunks twice:

1. sequentially, as plain calls of the tasks (outside a flow a task is a plain call);
2. as the flow, with ``processes=2``: two worker processes crunch two chunks at once.

It prints both times, the speedup (the process run includes starting the workers;
on a loaded machine the speedup may be small) and whether both runs gave identical
results. Process tasks need an import-safe script: the work is in ``main()``, under
``if __name__ == "__main__":``.

Run it with ``python examples/cpu_fanout.py``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import actorflow as af

N_CHUNKS = 8  # chunks of work, one process-task node each
CHUNK_SIZE = 30_000  # integers per chunk: about 0.25 s of pure Python on a laptop core
PROCESSES = 2  # worker processes of the flow run


def split(n_chunks: int, size: int) -> list[tuple[int, int]]:
    """Cut ``[1, 1 + n_chunks * size)`` into ``n_chunks`` half-open ranges."""
    return [(1 + i * size, 1 + (i + 1) * size) for i in range(n_chunks)]


@af.task(executor="process")
def crunch(lo: int, hi: int) -> dict[str, Any]:
    """Collatz sequence lengths over ``range(lo, hi)``: total steps and the longest one."""
    total = 0
    longest_n, longest_steps = lo, -1
    for n in range(lo, hi):
        x, steps = n, 0
        while x != 1:
            x = x // 2 if x % 2 == 0 else 3 * x + 1
            steps += 1
        total += steps
        if steps > longest_steps:
            longest_n, longest_steps = n, steps
    return {"range": (lo, hi), "total_steps": total, "longest": (longest_n, longest_steps)}


@af.task
def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of every chunk, in chunk order."""
    return {
        "chunks": parts,
        "total_steps": sum(p["total_steps"] for p in parts),
        "longest": max((p["longest"] for p in parts), key=lambda nl: nl[1]),
    }


@af.flow
def fanout() -> dict[str, Any]:
    """N_CHUNKS x crunch (in worker processes) -> combine."""
    # a static fan-out, known when the flow is traced: one node per chunk (crunch,
    # crunch_2, ...), all independent, so the run's worker processes take them as fast
    # as they free up; the list of Nodes passed to combine is gathered (fan-in)
    return combine([crunch(lo, hi) for lo, hi in split(N_CHUNKS, CHUNK_SIZE)])


def run_sequentially() -> dict[str, Any]:
    """The same work as plain calls, one chunk after another, in this process."""
    return combine([crunch(lo, hi) for lo, hi in split(N_CHUNKS, CHUNK_SIZE)])


def run_on_processes(processes: int = PROCESSES) -> tuple[dict[str, Any], list[int]]:
    """Run the flow on ``processes`` worker processes; return its result and the worker pids."""
    with fanout.start(processes=processes) as running:
        result = running.submit().result()
        metrics = running.metrics()
    pids = sorted(
        {
            worker["pid"]
            for name, m in metrics.items()
            if name == "crunch" or name.startswith("crunch_")
            for worker in m.workers
            if worker["pid"] is not None
        }
    )
    return result, pids


def main() -> dict[str, Any]:
    """Run the chunks sequentially, then on processes; print times, speedup, agreement."""
    print(
        f"CPU-bound fan-out: {N_CHUNKS} chunks of {CHUNK_SIZE:,} Collatz sequences "
        f"({os.cpu_count()} cores here)"
    )
    started = time.perf_counter()
    sequential = run_sequentially()
    sequential_s = time.perf_counter() - started
    print(f"  sequential (plain calls, 1 process):       {sequential_s:6.2f} s")

    started = time.perf_counter()
    parallel, pids = run_on_processes(PROCESSES)
    parallel_s = time.perf_counter() - started
    print(f"  executor='process', processes={PROCESSES}:        {parallel_s:6.2f} s")
    print(
        f"  crunch ran in {len(pids)} worker process(es) {pids}, "
        f"not in the parent (pid {os.getpid()}): {os.getpid() not in pids}"
    )

    speedup = sequential_s / parallel_s if parallel_s > 0 else float("inf")
    print(f"  speedup: {speedup:.2f}x (ideal {PROCESSES}x; includes starting the workers)")
    identical = parallel == sequential
    print(f"  results identical: {identical}")
    longest_n, longest_steps = parallel["longest"]
    print(
        f"  total Collatz steps: {parallel['total_steps']:,}; longest sequence starts at "
        f"{longest_n:,} ({longest_steps} steps)"
    )
    return {
        "sequential": sequential,
        "parallel": parallel,
        "sequential_s": sequential_s,
        "parallel_s": parallel_s,
        "speedup": speedup,
        "identical": identical,
        "worker_pids": pids,
    }


if __name__ == "__main__":
    main()
