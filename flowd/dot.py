"""A workflow as a Graphviz DOT graph (stdlib only: flowctl imports it).

``to_dot(wf)`` draws a workflow file; ``to_dot(wf, depths, title)`` draws a
run, with each channel's live depth (the daemon's ``graph`` command returns
``{"run", "state", "workflow": wf.to_dict(), "depths": {channel: n}}``;
``reply_to_dot`` turns that answer into DOT). Render it with e.g.
``flowctl graph wf.xml | dot -Tsvg > wf.svg``.

Shapes: a process is a box (its name, image, and lang, parallel, retries,
timeout and on-failure when they are not the defaults); a channel is an
ellipse (its name, then its depth or its initial items), with a double border
when nobody consumes it (a result channel); a mux is a small diamond named
``mux#N`` (N counts the muxes in file order). Edges run channel -> process
for inputs and process -> channel for outputs, labelled with the file name
in /task when ``as`` differs from the channel's name, and channel -> mux ->
channel for muxes.

Node ids are ``p:NAME``, ``c:NAME`` and ``m:N``, always quoted, so a process
and a channel may share a name. Every string is escaped, and the output
depends only on the workflow (file order), so the same input gives the same
text.
"""
from __future__ import annotations

from .model import Process, Workflow

__all__ = ["to_dot", "reply_to_dot", "quote"]

_RESULT_NOTE = "result"


def quote(text: object) -> str:
    """A DOT double-quoted string: quotes and backslashes escaped, line
    breaks as ``\\n`` (centered lines), other control characters dropped."""
    out = []
    for ch in str(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r" or ch == "\t":
            out.append(" ")
        elif ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF:
            continue  # control characters and lone surrogates have no place in a label
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _attrs(**attrs: object) -> str:
    """``[k="v", ...]`` in the given order; ``None`` values are left out."""
    parts = [f"{k}={quote(v)}" for k, v in attrs.items() if v is not None]
    return "[" + ", ".join(parts) + "]"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _seconds(s: float) -> str:
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if s >= size and s % size == 0:
            return f"{int(s // size)}{unit}"
    return f"{s * 1000:g}ms" if s < 1 else f"{s:g}s"


def _process_label(p: Process) -> str:
    lines = [p.name]
    if p.image:
        lines.append(p.image)
    extra = []
    if p.lang != "sh":
        extra.append(f"lang {p.lang}")
    if p.parallel != 1:
        extra.append(f"parallel {p.parallel}")
    if p.retries:
        extra.append(f"retries {p.retries}")
    if p.timeout:
        extra.append(f"timeout {_seconds(p.timeout)}")
    if p.on_failure != "stop":
        extra.append(f"on-failure {p.on_failure}")
    if extra:
        lines.append(", ".join(extra))
    return "\n".join(lines)


def to_dot(wf: Workflow, depths: dict[str, int] | None = None, title: str | None = None) -> str:
    """The workflow as a DOT ``digraph``, ending with a newline.

    ``depths`` (channel -> items queued now) turns on live depths: each
    channel's label says ``name (N)`` and non-empty channels are shaded.
    Without it, channels with initial items say how many. ``title`` (e.g.
    ``"3f9c2a71d0be (running)"``) goes under the workflow's name.
    """
    results = set(wf.result_channels())
    out: list[str] = []
    heading = f"workflow {wf.name}" + (" (service)" if wf.mode == "service" else "")
    if title:
        heading += f"\n{title}"
    out.append(f"digraph {quote(wf.name)} {{")
    out.append(f"  graph {_attrs(label=heading, labelloc='t', rankdir='LR', fontname='Helvetica')};")
    out.append('  node [fontname="Helvetica", fontsize="10"];')
    out.append('  edge [fontname="Helvetica", fontsize="9"];')

    # channels, in file order; then any channel named but not declared (only
    # a hand-made or damaged workflow has one: drawn dashed, never dropped)
    named: list[str] = []
    for p in wf.processes.values():
        named.extend(port.channel for port in p.inputs + p.outputs)
    for m in wf.muxes:
        named.extend(m.sources + m.targets)
    undeclared = list(dict.fromkeys(c for c in named if c not in wf.channels))

    if wf.channels or undeclared:
        out.append("")
        out.append("  // channels (double border: a result, nobody consumes it)")
    for name, ch in wf.channels.items():
        label = name
        shaded = False
        if depths is not None and name in depths:
            n = depths[name]
            label = f"{name} ({n})"
            shaded = bool(n)
        elif depths is None and ch.items:
            label = f"{name}\n{_plural(len(ch.items), 'initial item')}"
        if name in results:
            label += f"\n{_RESULT_NOTE}"
        out.append(f"  {quote('c:' + name)} " + _attrs(
            label=label, shape="ellipse",
            peripheries="2" if name in results else None,
            style="filled" if shaded else None,
            fillcolor="lightyellow" if shaded else None,
        ) + ";")
    for name in undeclared:
        out.append(f"  {quote('c:' + name)} " + _attrs(
            label=f"{name}\n(not declared)", shape="ellipse", style="dashed") + ";")

    if wf.processes:
        out.append("")
        out.append("  // processes")
    for name, p in wf.processes.items():
        out.append(f"  {quote('p:' + name)} " + _attrs(
            label=_process_label(p), shape="box", style="rounded,filled",
            fillcolor="lightblue") + ";")

    mux_ids = [f"m:{i}" for i in range(1, len(wf.muxes) + 1)]
    if wf.muxes:
        out.append("")
        out.append("  // muxes: every item of a from channel is copied to every to channel")
    for mid, m in zip(mux_ids, wf.muxes):
        out.append(f"  {quote(mid)} " + _attrs(
            label=m.name, shape="diamond", style="filled", fillcolor="lightgrey",
            fontsize="8", width="0.3", height="0.3", margin="0.02") + ";")

    edges: list[str] = []
    for name, p in wf.processes.items():
        pid = quote("p:" + name)
        for port in p.inputs:
            label = port.as_name if port.as_name != port.channel else None
            edges.append(f"  {quote('c:' + port.channel)} -> {pid}"
                         + (f" {_attrs(label=label)}" if label else "") + ";")
        for port in p.outputs:
            label = port.as_name if port.as_name != port.channel else None
            edges.append(f"  {pid} -> {quote('c:' + port.channel)}"
                         + (f" {_attrs(label=label)}" if label else "") + ";")
    for mid, m in zip(mux_ids, wf.muxes):
        for c in m.sources:
            edges.append(f"  {quote('c:' + c)} -> {quote(mid)};")
        for c in m.targets:
            edges.append(f"  {quote(mid)} -> {quote('c:' + c)};")
    if edges:
        out.append("")
        out.append("  // edges: inputs, outputs (labelled with the file name in /task when it differs)")
        out.extend(edges)
    out.append("}")
    return "\n".join(out) + "\n"


def reply_to_dot(reply: dict) -> str:
    """DOT for the daemon's answer to ``graph``: a run with live depths."""
    wf = Workflow.from_dict(reply["workflow"])
    title = f"{reply.get('run', '?')} ({reply.get('state', '?')})"
    return to_dot(wf, reply.get("depths") or {}, title=title)
