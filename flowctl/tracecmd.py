"""``flowctl trace`` and ``flowctl report``: a run's trace records, as a table,
JSON lines or CSV, or drawn into one HTML file (flowd/report.py).

The records come from the daemon a page at a time (command ``trace``) and
are printed as they come: a run of 100,000 attempts is never held whole for
a table, JSON or CSV. Every string in them may be a container's words
(``reason``): escaped for the terminal in the table; JSON escapes control
characters; CSV is for programs (quoted as CSV quotes, nothing else).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Iterator

from flowd.errors import FlowError, UsageError
from flowd.textsafe import for_terminal as _t

from . import fmt

TABLE_COLUMNS = [("TASK", "task"), ("PROCESS", "process"), ("TRY", "attempt"), ("STATE", "state"),
                 ("EXIT", "exit_status"), ("STARTED (UTC)", "started"), ("WAIT", "wait_seconds"),
                 ("RUN", "run_seconds"), ("PEAK MEM", "peak_memory"), ("CPU", "cpu_seconds"),
                 ("READ", "bytes_read"), ("WRITTEN", "bytes_written"), ("HOW", "started_how"),
                 ("NODE", "node"), ("REASON", "reason")]
TABLE_PAGE = 1000  # rows aligned together in the table (columns may shift from one page to the next)
MAX_REASON_SHOWN = 80


def add_parsers(add) -> None:
    """The subcommands' arguments (``add``: flowctl's ``add_parser``)."""
    p = add("trace", help="one row per task attempt: times, outcome, memory, cpu, bytes")
    p.add_argument("run")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="one JSON object a line")
    how.add_argument("--csv", action="store_true", help="CSV with a header line")
    p.add_argument("--process", help="only this process's attempts")

    p = add("report", help="one self-contained HTML file: summary, graph, timeline, "
                           "resources, failures")
    p.add_argument("run")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="where to write it (default: RUN.html here; - for stdout)")


def records(client, run: str, process: str | None = None) -> Iterator[list[dict]]:
    """The run's trace records, a page at a time, oldest first."""
    from flowd import trace as T  # here: flowctl's other commands start without it

    offset = 0
    while True:
        result, data = client.call("trace", {"run": run, "offset": offset})
        data = data or b""
        if not data:
            return
        offset += len(data)
        yield T.parse_lines(data, process)


def cmd_trace(client, args) -> int:
    from flowd import trace as T

    out = sys.stdout
    n = 0
    if args.csv:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(T.FIELDS)
    page: list[dict] = []
    for rows in records(client, args.run, args.process):
        for row in rows:
            n += 1
            if args.json:
                out.write(json.dumps(row) + "\n")
            elif args.csv:
                w.writerow(["" if row[k] is None else row[k] for k in T.FIELDS])
            else:
                page.append(row)
                if len(page) >= TABLE_PAGE:
                    print(_table(page, header=n <= TABLE_PAGE))
                    page = []
        out.flush()
    if not (args.json or args.csv):
        if page:
            print(_table(page, header=n <= TABLE_PAGE))
        elif n == 0:
            what = f" of process {args.process}" if args.process else ""
            print(_t(f"no task attempt{what} has ended yet in run {args.run}"), file=sys.stderr)
    return 0


def _table(rows: list[dict], header: bool) -> str:
    cells = [[_cell(k, r.get(k)) for _, k in TABLE_COLUMNS] for r in rows]
    text = fmt.table([h for h, _ in TABLE_COLUMNS], cells)
    return text if header else text.split("\n", 1)[1]


def _cell(key: str, v) -> str:
    if v is None or v == "":
        return "-"
    if key in ("peak_memory", "bytes_read", "bytes_written"):
        return fmt.size(v) if isinstance(v, int) else "?"
    if key in ("wait_seconds", "run_seconds", "cpu_seconds"):
        return f"{v:.2f}s" if isinstance(v, (int, float)) else "?"
    if key == "started":
        return _t(str(v)[:23])
    text = _t(str(v)).replace("\n", " ").replace("\t", " ")
    return text[:MAX_REASON_SHOWN - 3] + "..." if len(text) > MAX_REASON_SHOWN else text


def cmd_report(client, args) -> int:
    from flowd import report

    status, _ = client.call("status", {"run": args.run})
    run = status["run"]
    graph, _ = client.call("graph", {"run": run["id"]})
    rows: list[dict] = []
    for page in records(client, run["id"]):
        rows += page
    tails = _failed_tails(client, run["id"], rows)
    page = report.render(run, graph, rows, tails)
    target = args.output or f"{run['id']}.html"
    if target == "-":
        sys.stdout.write(page)
        return 0
    if os.path.isdir(target):
        raise UsageError(f"{target} is a folder; give -o a file name (e.g. {target}/report.html)")
    tmp = target + ".part"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, target)
    except OSError as e:
        raise UsageError(f"cannot write the report to {target}: {e.strerror or e}") from None
    print(_t(f"report of run {run['id']} ({len(rows)} task attempts) written to {target}"),
          file=sys.stderr)
    return 0


MAX_TAILS = 50  # failed attempts whose log tail goes in a report
TAIL_BYTES = 2048


def _failed_tails(client, run: str, rows: list[dict]) -> dict[str, str]:
    """The log tail of the first MAX_TAILS failed attempts: "task.attempt" -> text."""
    from flowd import trace as T

    out: dict[str, str] = {}
    for row in rows:
        if row["state"] == T.SUCCEEDED or not isinstance(row.get("task"), str):
            continue
        if len(out) >= MAX_TAILS:
            break
        try:
            logs, _ = client.call("logs", {"run": run, "process": row["process"], "task": row["task"]})
        except FlowError:  # a report without this tail is still a report
            continue
        for entry in logs.get("logs") or []:
            if entry.get("attempt") == row["attempt"] and not entry.get("running"):
                size = int(entry.get("size") or 0)
                res, data = client.call("read_log", {"run": run, "name": entry["name"],
                                                     "offset": max(0, size - TAIL_BYTES)})
                out[f"{row['task']}.{row['attempt']}"] = (data or b"").decode("utf-8", "replace")
                break
    return out


COMMANDS = {"trace": cmd_trace, "report": cmd_report}
