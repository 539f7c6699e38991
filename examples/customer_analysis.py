"""Complex customer analysis: diamond, fan-out, fan-in and a multi-level chain.

This is the 15-task "complex workflows" tutorial of the Cloacina workflow engine,
rewritten as an actorflow dataflow. Its diagram::

    prepare_dataset --> analyze_premium_customers  --> generate_customer_report
    prepare_dataset --> analyze_standard_customers --> generate_customer_report
    prepare_dataset --> distribute_workload --> process_batch_1..4 --> aggregate_batch_results
    aggregate_batch_results --> level_1_basic_analysis --> level_2_segment_analysis
        --> level_3_advanced_metrics --> level_4_predictive_insights
        --> final_comprehensive_report

Shared context versus values
----------------------------
In the tutorial every task takes one mutable ``context``, reads the keys it needs
with ``context.get(key)`` and publishes its result with ``context.set(key, value)``;
``dependencies=[...]`` only orders the tasks. In actorflow a task is a plain
function: what it wrote into the context is its *return value*, and what it read
is an *argument*. Passing the value is what creates the edge, so the order can
never disagree with the data:

=================================  ==================================================
tutorial context key               actorflow
=================================  ==================================================
``dataset``                        returned by ``prepare_dataset``; argument of both
                                   segment analyses, ``generate_customer_report`` and
                                   ``distribute_workload``
``premium_analysis``               returned by ``analyze_premium_customers``
``standard_analysis``              returned by ``analyze_standard_customers``
``customer_report``                returned by ``generate_customer_report``
``processing_batches``             the list returned by ``distribute_workload``;
                                   ``batches[i]`` (a Node of one element) feeds
                                   ``process_batch_{i+1}``
``batch_{i}_result``               returned by ``process_batch_{i}``; the four are
                                   passed as one list, which actorflow gathers
``aggregated_results``             returned by ``aggregate_batch_results``
``level_{n}_analysis``             returned by each level of the chain
``comprehensive_report``           returned by ``final_comprehensive_report``, which
                                   is what ``complex_customer_analysis.run()`` returns
``preparation_complete``,          dropped: a value that exists *is* the completion
``workload_distributed``           flag
=================================  ==================================================

Every edge of the diagram is here. A few more appear in the printed graph: the
diagram does not show reads that skip a level (``level_2_segment_analysis`` reads
``aggregated_results``; the final report reads ``customer_report`` and every level),
because the shared context carried them silently. With values they are edges of
their own, e.g. ``generate_customer_report --> final_comprehensive_report``, where the
diagram leaves the diamond dangling. (The tutorial's code even declares no
dependency for ``distribute_workload``, which reads ``dataset``: it only works if
``prepare_dataset`` happens to run first. Here that mistake cannot be written.)

The data is generated deterministically from a seed: customers with a segment,
region, annual value, order count, tenure and recency, scored per batch with an
RFM (recency, frequency, monetary) health score.

Run it with ``python examples/customer_analysis.py`` (this is ``make demo``).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import actorflow as af

N_CUSTOMERS = 100
SEED = 2024
BATCH_COUNT = 4

SEGMENTS = ("premium", "standard", "basic")
_SEGMENT_WEIGHTS = (15, 50, 35)
# segment -> (median annual value in $, spread of log value, orders range, mean days idle)
_SEGMENT_PROFILE = {
    "premium": (9_000.0, 0.35, (12, 60), 25.0),
    "standard": (2_500.0, 0.50, (4, 30), 60.0),
    "basic": (450.0, 0.60, (1, 12), 120.0),
}
_REGIONS = ("North America", "EMEA", "APAC", "LATAM")
_REGION_WEIGHTS = (40, 30, 20, 10)
_FIRST_NAMES = (
    "Ada", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Keiko", "Liam", "Maya", "Nikolai", "Olivia", "Pedro", "Quinn", "Rosa", "Sven", "Tara",
)  # fmt: skip
_LAST_NAMES = (
    "Andersen", "Baptiste", "Chen", "Dubois", "Eriksen", "Fischer", "Garcia", "Haddad",
    "Ivanova", "Jensen", "Kowalski", "Lopez", "Moreau", "Nakamura", "Okafor", "Patel",
)  # fmt: skip
CHURN_RISK_DAYS = 180  # idle for longer than this: at risk of churning
UPGRADE_SCORE = 50  # RFM score from which a non-premium customer is an upgrade candidate


def _plural(count: int, noun: str) -> str:
    """``count`` followed by ``noun``, with an ``s`` unless the count is one."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


# --- diamond: prepare -> (premium | standard) -> report -------------------------------


@af.task
def prepare_dataset(n_customers: int, seed: int) -> dict[str, Any]:
    """Generate ``n_customers`` realistic customers, deterministically from ``seed``."""
    rng = random.Random(seed)
    customers = []
    for customer_id in range(1, n_customers + 1):
        segment = rng.choices(SEGMENTS, weights=_SEGMENT_WEIGHTS)[0]
        median_value, spread, (min_orders, max_orders), mean_idle = _SEGMENT_PROFILE[segment]
        customers.append(
            {
                "id": customer_id,
                "name": f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}",
                "segment": segment,
                "region": rng.choices(_REGIONS, weights=_REGION_WEIGHTS)[0],
                "value": round(median_value * rng.lognormvariate(0.0, spread)),
                "orders": rng.randint(min_orders, max_orders),
                "tenure_years": rng.randint(1, 10),
                "days_since_last_order": min(720, int(rng.expovariate(1.0 / mean_idle))),
            }
        )
    return {"customers": customers, "total_records": len(customers), "seed": seed}


def _segment_summary(customers: list[dict[str, Any]], segment: str) -> dict[str, Any]:
    """Count, total and average value of the customers of one segment."""
    members = [c for c in customers if c["segment"] == segment]
    total = sum(c["value"] for c in members)
    return {
        "segment": segment,
        "count": len(members),
        "total_value": total,
        "average_value": total / len(members) if members else 0.0,
        "members": members,
    }


@af.task
def analyze_premium_customers(dataset: dict[str, Any]) -> dict[str, Any]:
    """Premium segment: size, value and the five most valuable customers (branch 1)."""
    summary = _segment_summary(dataset["customers"], "premium")
    members = summary.pop("members")
    summary["top_customers"] = sorted(members, key=lambda c: c["value"], reverse=True)[:5]
    return summary


@af.task
def analyze_standard_customers(dataset: dict[str, Any]) -> dict[str, Any]:
    """Standard segment: size, value and its low / medium / high distribution (branch 2)."""
    summary = _segment_summary(dataset["customers"], "standard")
    members = summary.pop("members")
    distribution = {"low (< $1,000)": 0, "medium ($1,000-4,999)": 0, "high (>= $5,000)": 0}
    for customer in members:
        if customer["value"] < 1_000:
            distribution["low (< $1,000)"] += 1
        elif customer["value"] < 5_000:
            distribution["medium ($1,000-4,999)"] += 1
        else:
            distribution["high (>= $5,000)"] += 1
    summary["distribution"] = distribution
    return summary


@af.task
def generate_customer_report(
    dataset: dict[str, Any], premium: dict[str, Any], standard: dict[str, Any]
) -> dict[str, Any]:
    """Join the two segment analyses into the segmentation report (the diamond's join)."""
    total = dataset["total_records"]
    return {
        "report_type": "customer_segmentation",
        "total_customers": total,
        "segment_analysis": {"premium": premium, "standard": standard},
        "summary": {
            "total_premium_value": premium["total_value"],
            "total_standard_value": standard["total_value"],
            "premium_percentage": 100.0 * premium["count"] / total if total else 0.0,
            "standard_percentage": 100.0 * standard["count"] / total if total else 0.0,
        },
    }


# --- fan-out: one batch per worker ----------------------------------------------------


@af.task
def distribute_workload(dataset: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Split the customers into ``BATCH_COUNT`` contiguous batches (the last takes the rest)."""
    customers = dataset["customers"]
    size = len(customers) // BATCH_COUNT
    return [
        customers[i * size : (i + 1) * size if i < BATCH_COUNT - 1 else len(customers)]
        for i in range(BATCH_COUNT)
    ]


def rfm_score(customer: dict[str, Any]) -> float:
    """RFM health score in [0, 100]: 40 % recency, 30 % frequency, 30 % monetary value."""
    recency = max(0.0, 1.0 - customer["days_since_last_order"] / 365.0)
    frequency = min(1.0, customer["orders"] / customer["tenure_years"] / 24.0)
    monetary = min(1.0, customer["value"] / 20_000.0)
    return round(100.0 * (0.4 * recency + 0.3 * frequency + 0.3 * monetary), 1)


def process_batch(batch: list[dict[str, Any]], batch_id: int) -> dict[str, Any]:
    """Score every customer of one batch and flag those at risk of churning."""
    processed = [
        {
            **customer,
            "score": rfm_score(customer),
            "churn_risk": customer["days_since_last_order"] > CHURN_RISK_DAYS,
            "batch": batch_id,
        }
        for customer in batch
    ]
    return {
        "batch_id": batch_id,
        "processed_count": len(processed),
        "customers": processed,
        "batch_total_value": sum(c["value"] for c in processed),
    }


# Four nodes named as in the tutorial's diagram, all running the same function. (When
# the number of batches depends on the data, as in the tutorial's "dynamic distribution",
# use `af.map(process_batch_task, batches, max_parallelism=4)` instead.)
PROCESS_BATCH = tuple(
    af.task(name=f"process_batch_{i}")(process_batch) for i in range(1, BATCH_COUNT + 1)
)


# --- fan-in ---------------------------------------------------------------------------


@af.task
def aggregate_batch_results(batch_results: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the scored batches back into one customer list with per-batch statistics."""
    customers = [c for result in batch_results for c in result["customers"]]
    total_value = sum(result["batch_total_value"] for result in batch_results)
    return {
        "total_customers_processed": len(customers),
        "total_value_processed": total_value,
        "average_customer_value": total_value / len(customers) if customers else 0.0,
        "batch_statistics": [
            {
                "batch_id": result["batch_id"],
                "count": result["processed_count"],
                "value": result["batch_total_value"],
                "avg_score": statistics.fmean(c["score"] for c in result["customers"])
                if result["customers"]
                else 0.0,
            }
            for result in sorted(batch_results, key=lambda r: r["batch_id"])
        ],
        "processed_customers": sorted(customers, key=lambda c: c["id"]),
    }


# --- multi-level chain ----------------------------------------------------------------


@af.task
def level_1_basic_analysis(aggregated: dict[str, Any]) -> dict[str, Any]:
    """Level 1: value and score statistics over every customer."""
    customers = aggregated["processed_customers"]
    values = [c["value"] for c in customers]
    scores = [c["score"] for c in customers]
    return {
        "level": 1,
        "customer_count": len(customers),
        "value_stats": {
            "min": min(values),
            "max": max(values),
            "avg": statistics.fmean(values),
            "median": statistics.median(values),
            "total": sum(values),
        },
        "score_stats": {"min": min(scores), "max": max(scores), "avg": statistics.fmean(scores)},
    }


@af.task
def level_2_segment_analysis(aggregated: dict[str, Any], level_1: dict[str, Any]) -> dict[str, Any]:
    """Level 2: per-segment size, value, score and share of revenue; per-region value."""
    customers = aggregated["processed_customers"]
    total_value = level_1["value_stats"]["total"]
    segments = {}
    for segment in SEGMENTS:
        members = [c for c in customers if c["segment"] == segment]
        if not members:
            continue
        values = [c["value"] for c in members]
        segments[segment] = {
            "count": len(members),
            "total_value": sum(values),
            "avg_value": statistics.fmean(values),
            "avg_score": statistics.fmean(c["score"] for c in members),
            "revenue_share": sum(values) / total_value if total_value else 0.0,
            "at_risk": sum(c["churn_risk"] for c in members),
            "at_risk_value": sum(c["value"] for c in members if c["churn_risk"]),
            "top_customer": max(members, key=lambda c: c["value"]),
        }
    regions = {}
    for region in _REGIONS:
        values = [c["value"] for c in customers if c["region"] == region]
        if values:
            regions[region] = {"count": len(values), "avg_value": statistics.fmean(values)}
    return {"level": 2, "segments": segments, "segment_count": len(segments), "regions": regions}


@af.task
def level_3_advanced_metrics(
    aggregated: dict[str, Any], level_1: dict[str, Any], level_2: dict[str, Any]
) -> dict[str, Any]:
    """Level 3: value percentiles, revenue concentration, segment comparison, outliers."""
    customers = aggregated["processed_customers"]
    ordered = sorted(c["value"] for c in customers)
    n = len(ordered)
    percentiles = {f"p{p}": ordered[min(n - 1, p * n // 100)] for p in (25, 50, 75, 90, 95)}
    top_fifth = ordered[n - max(1, n // 5) :]
    overall_avg = level_1["value_stats"]["avg"]
    return {
        "level": 3,
        "percentiles": percentiles,
        "top_20pct_revenue_share": sum(top_fifth) / sum(ordered) if ordered else 0.0,
        "segment_comparison": {
            name: {"relative_performance": data["avg_value"] / overall_avg if overall_avg else 0.0}
            for name, data in level_2["segments"].items()
        },
        "high_value_customers": [c for c in customers if c["value"] > percentiles["p95"]],
        "at_risk_high_value": [
            c for c in customers if c["churn_risk"] and c["value"] >= percentiles["p75"]
        ],
        "upgrade_candidates": [
            c for c in customers if c["segment"] != "premium" and c["score"] >= UPGRADE_SCORE
        ],
    }


@af.task
def level_4_predictive_insights(
    level_1: dict[str, Any], level_2: dict[str, Any], level_3: dict[str, Any]
) -> dict[str, Any]:
    """Level 4: rule-based insights, recommendations, risks and opportunities."""
    insights: list[str] = []
    recommendations: list[str] = []
    risks: list[str] = []
    opportunities: list[str] = []
    avg_value = level_1["value_stats"]["avg"]
    for name, data in level_2["segments"].items():
        if data["avg_value"] > 1.5 * avg_value:
            insights.append(
                f"{name.capitalize()} customers are worth ${data['avg_value']:,.0f} on average, "
                f"{data['avg_value'] / avg_value:.1f}x the overall ${avg_value:,.0f}"
            )
            recommendations.append(f"Focus retention efforts on {name} customers")
        if data["count"] < 10:
            risks.append(f"{name} segment has only {data['count']} customers")
        at_risk_share = data["at_risk_value"] / data["total_value"] if data["total_value"] else 0
        if at_risk_share > 0.2:
            risks.append(
                f"{name}: {at_risk_share:.0%} of revenue (${data['at_risk_value']:,}) comes "
                f"from customers idle for more than {CHURN_RISK_DAYS} days"
            )
    candidates = level_3["upgrade_candidates"]
    if candidates:
        opportunities.append(
            f"{_plural(len(candidates), 'standard or basic customer')} with an RFM score of "
            f"{UPGRADE_SCORE}+: offer a premium upgrade"
        )
    customer_count = level_1["customer_count"]
    best_region, best = max(level_2["regions"].items(), key=lambda kv: kv[1]["avg_value"])
    if best["count"] < customer_count / len(level_2["regions"]):
        opportunities.append(
            f"{best_region} has the highest average value (${best['avg_value']:,.0f}) "
            f"with only {best['count']} of {customer_count} customers: room to grow there"
        )
    concentration = level_3["top_20pct_revenue_share"]
    insights.append(f"The top 20% of customers bring {concentration:.0%} of revenue")
    recommendations.append(
        f"Target customers with values above ${level_3['percentiles']['p95']:,} "
        f"for premium services"
    )
    high_value = len(level_3["high_value_customers"])
    recommendations.append(
        f"Investigate {_plural(high_value, 'high-value customer')} for expansion opportunities"
    )
    at_risk = level_3["at_risk_high_value"]
    if at_risk:
        recommendations.append(
            f"Start a win-back campaign for {_plural(len(at_risk), 'high-value customer')} "
            f"at risk "
            f"({', '.join(c['name'] for c in at_risk[:3])}{', ...' if len(at_risk) > 3 else ''})"
        )
    return {
        "level": 4,
        "key_insights": insights,
        "recommendations": recommendations,
        "risk_factors": risks,
        "opportunities": opportunities,
    }


@af.task
def final_comprehensive_report(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Level 5: the comprehensive report, from every analysis (a gathered dict of values)."""
    level_1, level_2, level_4 = parts["level_1"], parts["level_2"], parts["level_4"]
    return {
        "report_title": "Comprehensive Customer Analysis Report",
        "executive_summary": {
            "total_customers_analyzed": level_1["customer_count"],
            "total_customer_value": level_1["value_stats"]["total"],
            "average_customer_value": level_1["value_stats"]["avg"],
            "segments_identified": level_2["segment_count"],
            "key_insights_count": len(level_4["key_insights"]),
            "recommendations_count": len(level_4["recommendations"]),
        },
        "detailed_analysis": {
            "diamond_pattern_results": parts["customer_report"],
            "fanout_processing_results": parts["aggregated"],
            "sequential_analysis": {
                "level_1_basic": level_1,
                "level_2_segments": level_2,
                "level_3_advanced": parts["level_3"],
                "level_4_insights": level_4,
            },
        },
        "key_insights": level_4["key_insights"],
        "actionable_recommendations": level_4["recommendations"],
        "risk_assessment": level_4["risk_factors"],
        "growth_opportunities": level_4["opportunities"],
    }


# --- the flow -------------------------------------------------------------------------


@af.flow
def complex_customer_analysis(n_customers: int, seed: int) -> dict[str, Any]:
    """All four patterns in one dataflow; each task fires as soon as its inputs exist.

    Inside the flow a task call returns a Node (a placeholder), so this body runs once,
    to trace the graph; ``complex_customer_analysis.run(n, seed)`` then runs the graph.
    """
    dataset = prepare_dataset(n_customers, seed)

    # Diamond: two independent branches run in parallel and join in the report.
    premium = analyze_premium_customers(dataset)
    standard = analyze_standard_customers(dataset)
    customer_report = generate_customer_report(dataset, premium, standard)

    # Fan-out: `batches[i]` is a Node of one element of the list.
    batches = distribute_workload(dataset)
    batch_results = [task(batches[i], i + 1) for i, task in enumerate(PROCESS_BATCH)]

    # Fan-in: a list of Nodes passed as one argument is gathered into a list of values.
    aggregated = aggregate_batch_results(batch_results)

    # Multi-level chain: each level builds on the previous ones.
    level_1 = level_1_basic_analysis(aggregated)
    level_2 = level_2_segment_analysis(aggregated, level_1)
    level_3 = level_3_advanced_metrics(aggregated, level_1, level_2)
    level_4 = level_4_predictive_insights(level_1, level_2, level_3)
    return final_comprehensive_report(
        {
            "customer_report": customer_report,
            "aggregated": aggregated,
            "level_1": level_1,
            "level_2": level_2,
            "level_3": level_3,
            "level_4": level_4,
        }
    )


# --- presentation ---------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """Render the comprehensive report as readable text."""
    summary = report["executive_summary"]
    details = report["detailed_analysis"]
    diamond = details["diamond_pattern_results"]
    fanout = details["fanout_processing_results"]
    level_1 = details["sequential_analysis"]["level_1_basic"]
    level_2 = details["sequential_analysis"]["level_2_segments"]
    level_3 = details["sequential_analysis"]["level_3_advanced"]

    lines = [f"=== {report['report_title']} ===", ""]
    lines += [
        f"Customers analyzed:     {summary['total_customers_analyzed']}",
        f"Total customer value:   ${summary['total_customer_value']:,}",
        f"Average customer value: ${summary['average_customer_value']:,.2f}",
        f"Segments identified:    {summary['segments_identified']}",
        "",
        "--- Diamond: segment report ---",
    ]
    for name, seg in diamond["segment_analysis"].items():
        share = diamond["summary"][f"{name}_percentage"]
        lines.append(
            f"  {name:<9} {seg['count']:>3} customers ({share:4.1f}%)  "
            f"total ${seg['total_value']:>9,}  avg ${seg['average_value']:>8,.0f}"
        )
    top = diamond["segment_analysis"]["premium"]["top_customers"]
    lines.append("  top premium: " + ", ".join(f"{c['name']} (${c['value']:,})" for c in top[:3]))
    distribution = diamond["segment_analysis"]["standard"]["distribution"]
    lines.append("  standard by value: " + ", ".join(f"{k}: {v}" for k, v in distribution.items()))

    lines += ["", f"--- Fan-out / fan-in: {len(fanout['batch_statistics'])} scored batches ---"]
    for batch in fanout["batch_statistics"]:
        lines.append(
            f"  batch {batch['batch_id']}: {batch['count']:>3} customers  "
            f"value ${batch['value']:>9,}  avg RFM score {batch['avg_score']:5.1f}"
        )

    stats, scores = level_1["value_stats"], level_1["score_stats"]
    lines += [
        "",
        "--- Multi-level chain ---",
        f"  level 1  value min ${stats['min']:,}  median ${stats['median']:,.0f}  "
        f"max ${stats['max']:,};  RFM score avg {scores['avg']:.1f} "
        f"(min {scores['min']}, max {scores['max']})",
    ]
    for name, seg in level_2["segments"].items():
        comparison = level_3["segment_comparison"][name]
        lines.append(
            f"  level 2  {name:<9} {seg['revenue_share']:6.1%} of revenue, "
            f"avg score {seg['avg_score']:4.1f}, {seg['at_risk']:>2} at risk, "
            f"{comparison['relative_performance']:.2f}x average value"
        )
    regions = "; ".join(
        f"{name} {r['count']} ${r['avg_value']:,.0f}" for name, r in level_2["regions"].items()
    )
    lines.append(f"  level 2  regions (customers, avg value): {regions}")
    percentiles = "  ".join(f"{k} ${v:,}" for k, v in level_3["percentiles"].items())
    lines.append(f"  level 3  percentiles: {percentiles}")

    for title, key in (
        ("Key insights", "key_insights"),
        ("Recommendations", "actionable_recommendations"),
        ("Risks", "risk_assessment"),
        ("Opportunities", "growth_opportunities"),
    ):
        lines += ["", f"--- {title} ({len(report[key])}) ---"]
        lines += [f"  {i}. {text}" for i, text in enumerate(report[key], 1)] or ["  (none)"]
    return "\n".join(lines)


def main(n_customers: int = N_CUSTOMERS, seed: int = SEED) -> dict[str, Any]:
    """Run the analysis, print the report and the graph as Mermaid; return the report."""
    graph = complex_customer_analysis.graph
    print(
        f"Running {len(graph.nodes)} tasks ({len(graph.edges)} edges): diamond, fan-out, "
        f"fan-in, multi-level chain; {n_customers} customers, seed {seed}"
    )
    started = time.perf_counter()
    report = complex_customer_analysis.run(n_customers, seed)
    elapsed = time.perf_counter() - started
    print(f"Workflow completed in {elapsed:.2f} s\n")
    print(format_report(report))
    print("\n--- Graph (Mermaid) ---")
    print(graph.to_mermaid())
    return report


if __name__ == "__main__":
    main()
