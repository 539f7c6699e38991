"""An ETL workflow manager: extract -> transform -> load, built with ``af.Graph``.

The classic hand-written workflow manager keeps ``Task(name, func, dependencies)``
objects, orders them with Kahn's topological sort (repeatedly run a task whose
in-degree is zero, then decrement its successors), and, if some tasks were never
reached, prints "Cycle detected or missing dependencies!" -- *after* having run
everything that came before the problem.

With actorflow the same workflow is a config-driven graph::

    g = af.Graph("etl")
    g.add("extract", extract)
    g.add("transform", transform, depends_on=["extract"])   # gets extract's output
    g.add("load", load, depends_on=["transform"])
    g.run(path)                                               # -> {"load": ...}

There is no scheduling loop to write: every node is an actor that fires as soon as
the outputs of its ``depends_on`` nodes have arrived (so independent nodes run in
parallel), and values travel along the edges instead of through globals. The
ordering check remains, moved to the front: a cycle or an unknown dependency is
refused with ``af.GraphError`` when the graph is built, before any task runs, with
a message naming the culprit.

The data is real when it is at hand: the 2,000-line Apache error log of the loghub
collection (``../shared/data/loghub/Apache_2k.log`` beside the repository, never
copied into it); otherwise a small Apache-style log generated from a seed.

Run it with ``python examples/etl_manager.py``.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import sqlite3
import tempfile
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import actorflow as af

LOGHUB_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "loghub"
APACHE_LOG = LOGHUB_DIR / "Apache_2k.log"

_LINE = re.compile(r"^\[(?P<ts>[^\]]+)\] \[(?P<level>[a-z]+)\] (?P<message>.*)$")
_NUMBER = re.compile(r"\b\d+\b")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_TIME_FORMAT = "%a %b %d %H:%M:%S %Y"

# The order in which the steps ran, as the seed's manager printed "Running task: ...".
_execution_log: list[str] = []
_execution_lock = threading.Lock()


def _ran(step: str) -> None:
    """Record that ``step`` started (steps of independent branches may interleave)."""
    with _execution_lock:
        _execution_log.append(step)


# --- the steps: plain functions, unit-testable without the engine ---------------------


def extract(path: str) -> list[str]:
    """Read the log file's lines (undecodable bytes are replaced, never fatal)."""
    _ran("extract")
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [line.rstrip("\n") for line in handle if line.strip()]


def parse_line(line: str) -> dict[str, Any] | None:
    """Parse one Apache error-log line into a record, or None if it is malformed."""
    match = _LINE.match(line)
    if match is None:
        return None
    try:
        ts = datetime.strptime(match["ts"], _TIME_FORMAT)
    except ValueError:
        return None
    message = match["message"]
    template = _NUMBER.sub("<*>", _IPV4.sub("<ip>", message))
    return {"ts": ts.isoformat(), "level": match["level"], "message": message, "template": template}


def transform(lines: list[str]) -> dict[str, Any]:
    """Parse every line; keep the malformed ones aside (with their line numbers)."""
    _ran("transform")
    records, rejected = [], []
    for number, line in enumerate(lines, 1):
        record = parse_line(line)
        if record is None:
            rejected.append({"line_no": number, "line": line[:200]})
        else:
            records.append({"line_no": number, **record})
    return {"records": records, "rejected": rejected, "lines": len(lines)}


def load(db_path: str, transformed: dict[str, Any]) -> dict[str, Any]:
    """Replace the ``events`` table of the SQLite database with the parsed records."""
    _ran("load")
    rows = [
        (r["line_no"], r["ts"], r["level"], r["message"], r["template"])
        for r in transformed["records"]
    ]
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute("DROP TABLE IF EXISTS events")
        conn.execute(
            "CREATE TABLE events (line_no INTEGER PRIMARY KEY, ts TEXT, level TEXT,"
            " message TEXT, template TEXT)"
        )
        conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", rows)
    return {"table": "events", "rows": len(rows)}


def quality_check(transformed: dict[str, Any]) -> dict[str, Any]:
    """Share of lines that parsed, and a sample of the rejected ones."""
    _ran("quality_check")
    lines, rejected = transformed["lines"], transformed["rejected"]
    return {
        "lines": lines,
        "rejected": len(rejected),
        "parsed_ratio": (lines - len(rejected)) / lines if lines else 1.0,
        "sample": rejected[:3],
    }


def report(db_path: str, loaded: dict[str, Any], quality: dict[str, Any]) -> dict[str, Any]:
    """Query the loaded table: levels, most frequent error templates, busiest hour, span."""
    _ran("report")
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        levels = dict(
            conn.execute(
                "SELECT level, COUNT(*) FROM events GROUP BY level ORDER BY COUNT(*) DESC"
            ).fetchall()
        )
        top_errors = conn.execute(
            "SELECT template, COUNT(*) FROM events WHERE level = 'error'"
            " GROUP BY template ORDER BY COUNT(*) DESC, template LIMIT 5"
        ).fetchall()
        busiest = conn.execute(
            "SELECT substr(ts, 1, 13), COUNT(*) FROM events GROUP BY 1"
            " ORDER BY COUNT(*) DESC, 1 LIMIT 1"
        ).fetchone()
        first, last = conn.execute("SELECT MIN(ts), MAX(ts) FROM events").fetchone()
    return {
        "rows": loaded["rows"],
        "levels": levels,
        "top_errors": top_errors,
        "busiest_hour": busiest,
        "first": first,
        "last": last,
        "quality": quality,
    }


# --- the graphs -----------------------------------------------------------------------


def build_etl_graph(db_path: str) -> af.Graph:
    """extract -> transform -> (load | quality_check) -> report, loading into ``db_path``."""
    g = af.Graph("etl")
    g.add("extract", extract)  # a root node: receives the run's argument (the log path)
    g.add("transform", transform, depends_on=["extract"])
    g.add("load", functools.partial(load, db_path), depends_on=["transform"])
    g.add("quality_check", quality_check, depends_on=["transform"])
    # outputs of depends_on are passed positionally in list order: report(db, loaded, quality)
    g.add("report", functools.partial(report, db_path), depends_on=["load", "quality_check"])
    return g


def build_cyclic_graph(db_path: str) -> af.Graph:
    """A broken ETL graph: ``transform`` depends on ``load`` by mistake, closing a cycle."""
    g = af.Graph("etl_cycle")
    g.add("extract", extract)
    g.add("transform", transform, depends_on=["load"])  # should be "extract"
    g.add("load", functools.partial(load, db_path), depends_on=["transform"])
    return g


def build_graph_with_missing_dependency(db_path: str) -> af.Graph:
    """A broken ETL graph: ``transform`` depends on a misspelled, unknown node."""
    g = af.Graph("etl_typo")
    g.add("extract", extract)
    # names may refer to nodes added later, so unknown names are checked at run / start
    g.add("transform", transform, depends_on=["extrakt"])  # should be "extract"
    g.add("load", functools.partial(load, db_path), depends_on=["transform"])
    return g


# --- a generated log, when the real one is not at hand --------------------------------


def generate_apache_log(path: Path, lines: int = 300, seed: int = 4) -> Path:
    """Write a deterministic Apache-style error log of ``lines`` lines to ``path``."""
    rng = random.Random(seed)
    ts = datetime(2005, 12, 4, 4, 47, 44)
    out = []
    for _ in range(lines):
        ts += timedelta(seconds=rng.randint(1, 90))
        pick = rng.random()
        if pick < 0.55:
            level = "notice"
            message = (
                f"jk2_init() Found child {rng.randint(1000, 9999)} "
                f"in scoreboard slot {rng.randint(1, 12)}"
            )
        elif pick < 0.70:
            level, message = "notice", "workerEnv.init() ok /etc/httpd/conf/workers2.properties"
        elif pick < 0.88:
            level, message = "error", f"mod_jk child workerEnv in error state {rng.randint(6, 9)}"
        else:
            ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
            level = "error"
            message = f"[client {ip}] Directory index forbidden by rule: /var/www/html/"
        out.append(f"[{ts.strftime(_TIME_FORMAT)}] [{level}] {message}")
    out.insert(lines // 2, "this line is not in the Apache error-log format")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


# --- main -----------------------------------------------------------------------------


def _pick_log(log_path: Path | None, workdir: Path) -> tuple[Path, str]:
    """The log to process and its description: the given one, loghub's, or a generated one."""
    if log_path is None and APACHE_LOG.exists():
        log_path = APACHE_LOG
    if log_path is not None:
        return log_path, f"{log_path.name} ({log_path.stat().st_size:,} bytes)"
    return generate_apache_log(workdir / "generated_apache.log"), "a generated Apache log"


def _refusal(name: str, graph: af.Graph, argument: str) -> str:
    """Run a broken graph and return the text of the ``af.GraphError`` that refuses it."""
    before = len(_execution_log)
    try:
        graph.run(argument)
    except af.GraphError as exc:
        ran = _execution_log[before:]
        return f"GraphError: {exc}  [tasks run before the refusal: {len(ran)}]"
    raise AssertionError(f"graph {name!r} was not refused")  # pragma: no cover


def main(log_path: Path | None = None) -> dict[str, Any]:
    """Run the ETL over a log, print what it found, and show two refused graphs."""
    _execution_log.clear()
    with tempfile.TemporaryDirectory(prefix="actorflow-etl-") as tmp:
        source, description = _pick_log(log_path, Path(tmp))
        db_path = str(Path(tmp) / "etl.db")
        graph = build_etl_graph(db_path)
        print(f"ETL over {description}")
        print("Graph 'etl': " + ", ".join(f"{a} -> {b}" for a, b in graph.edges))

        outputs = graph.run(str(source))
        result = outputs["report"]
        order = list(_execution_log)
        print("Execution order: " + " -> ".join(order))

        quality = result["quality"]
        print(
            f"\nExtracted {quality['lines']:,} lines; {quality['lines'] - quality['rejected']:,} "
            f"parsed ({quality['parsed_ratio']:.1%}), {quality['rejected']} rejected; "
            f"loaded {result['rows']:,} rows into table 'events' (SQLite)"
        )
        for sample in quality["sample"]:
            print(f"  rejected line {sample['line_no']}: {sample['line']!r}")
        print(f"Time span: {result['first']} .. {result['last']}")
        total = sum(result["levels"].values())
        print(
            "Levels: "
            + ", ".join(f"{lvl} {n:,} ({n / total:.1%})" for lvl, n in result["levels"].items())
        )
        print("Most frequent error messages:")
        for template, count in result["top_errors"]:
            print(f"  {count:>5,}  {template}")
        hour, count = result["busiest_hour"]
        print(f"Busiest hour: {hour.replace('T', ' ')}:00 with {count:,} events")

        print("\nBroken graphs are refused before any task runs:")
        refusals = {
            "cycle": _refusal("etl_cycle", build_cyclic_graph(db_path), str(source)),
            "missing dependency": _refusal(
                "etl_typo", build_graph_with_missing_dependency(db_path), str(source)
            ),
        }
        for what, message in refusals.items():
            print(f"  {what}: {message}")
    return {"report": result, "order": order, "refusals": refusals, "source": str(source)}


if __name__ == "__main__":
    main()
