"""``flowctl report``: one run as one self-contained HTML file (stdlib only).

Drawn by flowctl from what the daemon answers (``status RUN``, ``graph``,
the trace, log tails); the daemon renders nothing. The page needs no network:
its CSS, script and pictures are in it. What it shows:

- a summary: state, times, counts, who submitted it;
- the workflow graph as SVG, laid out here in layers (no Graphviz needed);
- a timeline, one bar per task attempt (waiting, then running; failures in red);
- per-process run time and peak memory, as bar plots;
- the failed attempts with the tail of their logs.

Escaping: every string a user or a container chose (names, reasons, log
tails) is put in the page either through ``html.escape`` or inside the JSON
data blob, whose ``<``, ``>`` and ``&`` are written as ``\\u003c`` etc. so no
string can end the script element; the script writes strings into the page
with ``textContent`` only, never as HTML. The timeline and plots are drawn by
a small script from that blob, so the file stays small and quick to open at
10,000 attempts.
"""
from __future__ import annotations

import html
import json
import time
from datetime import datetime, timezone

from .model import Workflow
from .report_page import CSS, SCRIPT

MAX_TAIL_CHARS = 4000
MAX_FAILURES_SHOWN = 50


def _e(s: object) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _blob(data: object) -> str:
    """JSON that is safe inside a <script> element (no "</script>", no "<!--")."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _when(t: object) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _dur(s: object) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


# -- the graph --------------------------------------------------------------------------
def graph_svg(wf: Workflow) -> str:
    """The workflow as SVG: channels (ellipses), processes (boxes), muxes
    (diamonds), left to right by their longest path from a start."""
    nodes: dict[str, tuple[str, str]] = {}  # id -> (kind, label)
    edges: list[tuple[str, str]] = []
    for name in wf.channels:
        nodes["c:" + name] = ("channel", name)
    for name, p in wf.processes.items():
        nodes["p:" + name] = ("process", name)
        for port in p.inputs:
            nodes.setdefault("c:" + port.channel, ("channel", port.channel))
            edges.append(("c:" + port.channel, "p:" + name))
        for port in p.outputs:
            nodes.setdefault("c:" + port.channel, ("channel", port.channel))
            edges.append(("p:" + name, "c:" + port.channel))
    for i, m in enumerate(wf.muxes, 1):
        mid = f"m:{i}"
        nodes[mid] = ("mux", m.name)
        for c in m.sources:
            nodes.setdefault("c:" + c, ("channel", c))
            edges.append(("c:" + c, mid))
        for c in m.targets:
            nodes.setdefault("c:" + c, ("channel", c))
            edges.append((mid, "c:" + c))
    layer = {n: 0 for n in nodes}
    for _ in range(len(nodes)):  # longest path; a cycle stops growing after len(nodes) rounds
        changed = False
        for a, b in edges:
            if layer[b] < layer[a] + 1 and layer[a] + 1 < len(nodes):
                layer[b] = layer[a] + 1
                changed = True
        if not changed:
            break
    columns: dict[int, list[str]] = {}
    for n in nodes:  # file order within a layer
        columns.setdefault(layer[n], []).append(n)
    col_w, row_h, box_w, box_h = 190, 64, 150, 36
    pos = {}
    for col, names in columns.items():
        for row, n in enumerate(names):
            pos[n] = (20 + col * col_w, 20 + row * row_h)
    width = 40 + (max(columns) + 1 if columns else 1) * col_w
    height = 40 + max((len(v) for v in columns.values()), default=1) * row_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="workflow graph">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
           'fill="#555"/></marker></defs>']
    for a, b in edges:
        (xa, ya), (xb, yb) = pos[a], pos[b]
        out.append(f'<line x1="{xa + box_w}" y1="{ya + box_h / 2}" x2="{xb}" y2="{yb + box_h / 2}" '
                   f'stroke="#555" marker-end="url(#arrow)"/>')
    for n, (kind, label) in nodes.items():
        x, y = pos[n]
        short = label if len(label) <= 22 else label[:21] + "\u2026"
        if kind == "process":
            shape = (f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" '
                     f'fill="#cfe3f7" stroke="#3a6ea5"/>')
        elif kind == "mux":
            cx, cy = x + box_w / 2, y + box_h / 2
            shape = (f'<polygon points="{cx},{y} {cx + 40},{cy} {cx},{y + box_h} {cx - 40},{cy}" '
                     f'fill="#ddd" stroke="#666"/>')
        else:
            shape = (f'<ellipse cx="{x + box_w / 2}" cy="{y + box_h / 2}" rx="{box_w / 2}" '
                     f'ry="{box_h / 2}" fill="#fff8d8" stroke="#a08b2c"/>')
        out.append(f'<g class="node {kind}"><title>{_e(kind)} {_e(label)}</title>{shape}'
                   f'<text x="{x + box_w / 2}" y="{y + box_h / 2 + 4}" text-anchor="middle">'
                   f'{_e(short)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


# -- the page ---------------------------------------------------------------------------
def _slim(rows: list[dict]) -> dict:
    """The trace as columns (smaller than objects, quick to parse)."""
    keys = ("task", "process", "attempt", "state", "exit_status", "reason", "queued_at",
            "started_at", "finished_at", "peak_memory", "cpu_seconds", "started_how", "node")
    return {"keys": list(keys), "rows": [[r.get(k) for k in keys] for r in rows]}


def summary_html(run: dict, rows: list[dict]) -> str:
    states: dict[str, int] = {}
    for r in rows:
        states[r.get("state") or "?"] = states.get(r.get("state") or "?", 0) + 1
    tasks = {(r.get("process"), r.get("task")) for r in rows}
    items = [
        ("run", run.get("id")), ("workflow", run.get("name")), ("state", run.get("state")),
        ("submitted by", run.get("owner")), ("submitted", _when(run.get("submitted_at"))),
        ("started", _when(run.get("started_at"))), ("finished", _when(run.get("finished_at"))),
        ("elapsed", _dur(run.get("elapsed"))),
        ("tasks done / failed", f"{run.get('tasks_done', 0)} / {run.get('tasks_failed', 0)}"),
        ("task attempts", f"{len(rows)} ({len(tasks)} tasks; "
                          + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")"),
    ]
    if run.get("message"):
        items.append(("message", run.get("message")))
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f'<table class="summary" id="summary">{cells}</table>'


def failures_html(rows: list[dict], tails: dict[str, str]) -> str:
    failed = [r for r in rows if r.get("state") != "succeeded"]
    if not failed:
        return '<p class="none">No task attempt failed.</p>'
    parts = []
    for r in failed[:MAX_FAILURES_SHOWN]:
        tail = tails.get(f"{r.get('task')}.{r.get('attempt')}", "")
        if len(tail) > MAX_TAIL_CHARS:
            tail = tail[-MAX_TAIL_CHARS:]
        parts.append(
            '<div class="failure">'
            f'<h3>{_e(r.get("process"))} task {_e(r.get("task"))}, attempt {_e(r.get("attempt"))}: '
            f'<span class="state {_e(r.get("state"))}">{_e(r.get("state"))}</span></h3>'
            f'<p class="reason">{_e(r.get("reason"))}</p>'
            + (f'<pre class="tail">{_e(tail)}</pre>' if tail else '<p class="none">no log output</p>')
            + "</div>")
    more = len(failed) - MAX_FAILURES_SHOWN
    if more > 0:
        parts.append(f'<p class="none">{more} more failed attempts: see flowctl trace.</p>')
    return "\n".join(parts)


def render(run: dict, graph: dict, rows: list[dict], tails: dict[str, str],
           now: float | None = None) -> str:
    """The page: ``run`` is ``status RUN``'s run, ``graph`` the ``graph`` answer,
    ``rows`` the trace records, ``tails`` "task.attempt" -> its log tail."""
    wf = Workflow.from_dict(graph["workflow"])
    made = _when(now if now is not None else time.time())
    title = f"flowd run {run.get('id')} ({run.get('name')})"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>{_e(title)}</title>
<style>{CSS}</style>
<script>
window.onerror = function (msg, src, line) {{
  var d = document.createElement("div");
  d.className = "script-error"; d.id = "script-error";
  d.textContent = "script error: " + msg + " (line " + line + ")";
  (document.body || document.documentElement).appendChild(d);
}};
</script>
</head><body>
<h1>{_e(title)}</h1>
<p class="made">Report made {_e(made)} by flowctl report.</p>
<h2>Summary</h2>
{summary_html(run, rows)}
<h2>Workflow</h2>
<div class="scroll">{graph_svg(wf)}</div>
<h2>Timeline</h2>
<p class="legend"><span class="key wait"></span> waiting (queued, container starting)
<span class="key ok"></span> running, succeeded <span class="key bad"></span> running, failed
<span class="key other"></span> cancelled or lost. One bar per task attempt; hover for details.</p>
<div class="scroll" id="timeline-box"><svg id="timeline" xmlns="http://www.w3.org/2000/svg"></svg></div>
<div id="tip"></div>
<h2>Per process</h2>
<div class="plots"><div><h3>Run time (total seconds)</h3><svg id="plot-time"></svg></div>
<div><h3>Peak memory (highest of its attempts)</h3><svg id="plot-mem"></svg></div></div>
<h2>Failures</h2>
{failures_html(rows, tails)}
<script type="application/json" id="trace-data">{_blob(_slim(rows))}</script>
<script>{SCRIPT}</script>
</body></html>
"""
