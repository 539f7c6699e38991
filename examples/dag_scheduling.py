"""DAG scheduling: ``depends_on``, independent IO-bound steps in parallel, nesting.

A pipeline library's "advanced patterns" tutorial declares steps with explicit
dependencies and lets the engine compute the execution order::

    executor = ParallelExecutor(max_workers=4)
    executor.add_step("fetch", fetch_data, mode=ExecutionMode.IO_BOUND)
    executor.add_step("clean", clean_data, depends_on=["fetch"])
    executor.add_step("analyze", analyze_data, depends_on=["clean"])
    executor.add_step("report", generate_report, depends_on=["analyze"])

and composes pipelines by nesting a "Worker" pipeline (validate, transform) inside a
"Master" pipeline (fetch_raw, Worker, save_final).

This example does both with actorflow:

1. ``af.Graph`` with ``depends_on``: three independent fetches (blocking calls, like
   HTTP requests or database queries) run at the same time, the two cleaning steps
   too, and ``analyze`` fires when its three inputs have arrived. There is no
   execution order to compute: every node is an actor that fires on its inputs.
2. ``@af.flow`` with a nested structure: a "worker" sub-pipeline applied to every
   region, its results gathered from a dict of Nodes, the flow returning a nested
   dict of Nodes.

Every blocking step sleeps ``STEP_S`` seconds; the example prints the elapsed time
next to the sum of the sleeps (what running the steps one after another would
take) and the largest number of steps that were blocked at the same moment.

Run it with ``python examples/dag_scheduling.py``.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import actorflow as af

# Every step here is a thread task: right for IO-bound work, since a blocking call
# releases the GIL. CPU-bound steps (the tutorial's `use_processes=True`) will take
# `@af.task(executor="process")`; the process executor comes in a later milestone.

STEP_S = 0.1  # how long each simulated blocking call takes
REGIONS = ("emea", "americas", "apac")


class OverlapMeter:
    """Counts blocking calls in progress; remembers how many ran at once, and their total."""

    def __init__(self) -> None:
        """Start with no call recorded."""
        self._lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.calls = 0
        self.total_s = 0.0

    def reset(self) -> None:
        """Forget every recorded call."""
        with self._lock:
            self.active = self.peak = self.calls = 0
            self.total_s = 0.0

    def block(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``, as a network or disk call would."""
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.calls += 1
            self.total_s += seconds
        try:
            time.sleep(seconds)
        finally:
            with self._lock:
                self.active -= 1


meter = OverlapMeter()


# --- 1. a graph built with depends_on ------------------------------------------------


def fetch_users() -> list[dict[str, Any]]:
    """Fetch the user accounts (one blocking call); a few lack a country."""
    meter.block(STEP_S)
    countries = ("DE", "FR", "US", "BR", "JP", None)
    return [{"id": i, "country": countries[i % len(countries)]} for i in range(1, 25)]


def fetch_orders() -> list[dict[str, Any]]:
    """Fetch yesterday's orders (one blocking call); some have a zero quantity."""
    meter.block(STEP_S)
    rng = random.Random(0)
    return [
        {
            "id": n,
            "user": rng.randint(1, 24),
            "sku": rng.choice(("A-100", "B-200", "C-300")),
            "qty": rng.randint(0, 4),
        }
        for n in range(1, 61)
    ]


def fetch_prices() -> dict[str, float]:
    """Fetch the price list (one blocking call)."""
    meter.block(STEP_S)
    return {"A-100": 19.90, "B-200": 49.00, "C-300": 5.25}


def clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop incomplete rows (a missing field, no quantity); one blocking call to an audit log."""
    meter.block(STEP_S)
    return [r for r in rows if None not in r.values() and r.get("qty", 1) > 0]


def analyze(
    users: list[dict[str, Any]], orders: list[dict[str, Any]], prices: dict[str, float]
) -> dict[str, Any]:
    """Revenue and order count per country, over orders of known users only."""
    country_of = {u["id"]: u["country"] for u in users}
    revenue: dict[str, float] = {}
    counts: dict[str, int] = {}
    for order in orders:
        country = country_of.get(order["user"])
        if country is None:
            continue
        revenue[country] = revenue.get(country, 0.0) + order["qty"] * prices[order["sku"]]
        counts[country] = counts.get(country, 0) + 1
    return {
        "revenue": {c: round(v, 2) for c, v in sorted(revenue.items())},
        "orders": dict(sorted(counts.items())),
    }


def generate_report(analysis: dict[str, Any]) -> list[str]:
    """One line per country, by revenue."""
    ranked = sorted(analysis["revenue"].items(), key=lambda kv: kv[1], reverse=True)
    return [
        f"{country}: {analysis['orders'][country]:>2} orders, ${revenue:>8,.2f}"
        for country, revenue in ranked
    ]


def build_graph() -> af.Graph:
    """fetch_{users,orders,prices} -> clean_{users,orders} -> analyze -> report."""
    g = af.Graph("dag_scheduling")
    g.add("fetch_users", fetch_users)  # three roots: nothing orders them,
    g.add("fetch_orders", fetch_orders)  # so they run at the same time
    g.add("fetch_prices", fetch_prices)
    g.add("clean_users", clean, depends_on=["fetch_users"])
    g.add("clean_orders", clean, depends_on=["fetch_orders"])
    g.add("analyze", analyze, depends_on=["clean_users", "clean_orders", "fetch_prices"])
    g.add("report", generate_report, depends_on=["analyze"])
    return g


# --- 2. a flow with a nested structure -----------------------------------------------


@af.task
def fetch_raw(region: str) -> list[dict[str, Any]]:
    """Fetch a region's raw sales records (one blocking call)."""
    meter.block(STEP_S)
    rng = random.Random(region)
    return [{"region": region, "amount": round(rng.uniform(-20.0, 400.0), 2)} for _ in range(40)]


@af.task
def validate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the records with a positive amount (refunds are handled elsewhere)."""
    return [r for r in rows if r["amount"] > 0]


@af.task
def transform(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise a region: record count, total and average amount."""
    total = round(sum(r["amount"] for r in rows), 2)
    return {"records": len(rows), "total": total, "average": round(total / len(rows), 2)}


@af.task
def save_final(per_region: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write every region's summary (one blocking call); return what was saved."""
    meter.block(STEP_S)
    return {
        "regions_saved": sorted(per_region),
        "grand_total": round(sum(s["total"] for s in per_region.values()), 2),
    }


def worker(raw: Any) -> Any:
    """The "Worker" sub-pipeline: validate, then transform.

    A plain function that calls tasks: inside a flow its nodes are inlined into the
    caller's graph. (A real sub-flow, an ``@af.flow`` called inside another flow with
    its actors under their own supervisor, comes in a later milestone.)
    """
    return transform(validate(raw))


@af.flow
def master() -> dict[str, Any]:
    """The "Master" pipeline: fetch_raw -> worker -> save_final, for every region at once."""
    per_region = {region: worker(fetch_raw(region)) for region in REGIONS}
    # a dict of Nodes passed as one argument is gathered into a dict of values
    return {"regions": per_region, "saved": save_final(per_region)}


# --- main ------------------------------------------------------------------------------


def _timed(label: str, run: Any) -> dict[str, Any]:
    """Run ``run()`` with a fresh meter; print and return elapsed time against the sleeps."""
    meter.reset()
    started = time.perf_counter()
    output = run()
    elapsed = time.perf_counter() - started
    print(
        f"  {label}: {elapsed:.2f} s elapsed for {meter.calls} blocking steps sleeping "
        f"{meter.total_s:.2f} s in total; at most {meter.peak} blocked at once"
    )
    return {
        "output": output,
        "elapsed_s": elapsed,
        "sleep_total_s": meter.total_s,
        "calls": meter.calls,
        "peak": meter.peak,
    }


def main() -> dict[str, Any]:
    """Run both parts and print their results, timings and graphs."""
    graph = build_graph()
    print("1. af.Graph with depends_on (critical path: fetch -> clean = 2 blocking steps)")
    part_1 = _timed("graph.run()", graph.run)
    for line in part_1["output"]["report"]:
        print(f"     {line}")

    print("\n2. @af.flow with a nested worker per region (critical path: 2 blocking steps)")
    part_2 = _timed("master.run()", master.run)
    for region, summary in part_2["output"]["regions"].items():
        print(
            f"     {region:<9} {summary['records']:>2} valid records, "
            f"total ${summary['total']:>9,.2f}, average ${summary['average']:.2f}"
        )
    saved = part_2["output"]["saved"]
    print(
        f"     saved {len(saved['regions_saved'])} regions "
        f"({', '.join(saved['regions_saved'])}), grand total ${saved['grand_total']:,.2f}"
    )

    print("\nGraph of part 1 (Mermaid):")
    print(graph.to_mermaid())
    return {"graph": part_1, "flow": part_2}


if __name__ == "__main__":
    main()
