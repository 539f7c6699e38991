"""actorflow benchmark suite.

Run from the repository root with ``python -m bench`` (or ``make bench``). It
measures actorflow against the limit (a plain Python loop calling the same task
functions) and against peers (raw pykka actors wired with ``tell``, dask's
threaded scheduler when it is installed, ``ProcessPoolExecutor``, bytewax when
installed), all in the same run, and prints a
table of the measurements, their ratios and the targets from DESIGN.md.

Workloads:

- **W1a** a 10-stage chain of ``x + 1`` in a started graph, one item at a time:
  median and p99 latency.
- **W1b** the same chain, 20,000 items through ``running.map``: items/s.
- **W3a** a batch DAG source -> 1,000 independent tasks -> sum built with
  ``af.Graph``: wall time per task, building and starting included.
- **W3b** a 15-node flow: time to result from a cold process, and warm (a
  freshly built flow in a process that has already run one).
- **W4** 8 CPU-bound pure-Python tasks as ``executor="process"`` nodes on
  ``processes=2``: speedup over a sequential loop, cold and warm, against
  ``concurrent.futures.ProcessPoolExecutor(2)``.
- **W2** JSON log lines, parse -> keep WARN/ERROR -> per-service totals in the
  caller: thread tasks, and process tasks fused in the workers, against the plain
  loop, ``ProcessPoolExecutor`` and bytewax; peak memory of each.
- **W5** RSS per 1,000 idle nodes of a started graph, against raw pykka actors.
- **async** 10,000 ``asyncio.sleep(0.1)`` calls through an async task with
  ``concurrency=1000``, against plain asyncio.

Importing this package is cheap on purpose: the cold-start workload imports
``bench.workloads`` inside a fresh interpreter.
"""

import os

# os.path, not pathlib: importing pathlib would cost the cold-start baseline ~10 ms
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
