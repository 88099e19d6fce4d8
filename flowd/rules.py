"""The rules of a workflow's graph, checked on the model (stdlib only).

``check_graph(wf, report, workflow_line)`` runs on a ``flowd.model.Workflow``
as translated from the file, and reports into a ``flowd.problems.Report``:
every channel named is declared; a process reads and writes each channel
once and never one channel both ways; a channel has exactly one consumer
(process or mux); there is no cycle. Warnings: a channel nobody uses, a
workflow without processes, and, in batch mode, a process that can never
run. Each problem names the line the model keeps on each Channel, Port,
Process and Mux (``workflow_line`` is the line of ``<workflow>``), so the
messages read as before, with no XML at hand.
"""
from __future__ import annotations

from flowd import model
from flowd.model import Workflow
from flowd.problems import Report, closest, quote as _q


def check_graph(wf: Workflow, report: Report, workflow_line: int | None = None) -> None:
    """Report what breaks the rules of the graph; ``workflow_line`` is <workflow>'s line."""
    declared = wf.channels
    procs = list(wf.processes.values())
    muxes = wf.muxes

    mux_line = {m.name: m.line for m in muxes}

    def where(node: str) -> str:
        if node in wf.processes:
            return f'process "{node}" (line {wf.processes[node].line})'
        return f"{node} (the <mux> of line {mux_line[node]})"

    def undeclared(ch: str, line, element: str) -> bool:
        if ch in declared:
            return False
        best = closest(ch, declared) if report.room() else None
        report.error(f"channel {_q(ch)} is not declared" + (f'; did you mean "{best}"?' if best else ""),
                     f'declare it with <channel name="{ch}"/>' if model.NAME_RE.match(ch)
                     else "name a declared channel", line=line, element=element)
        return True

    # every channel named is declared; who reads and writes what
    readers: dict[str, list[tuple[str, int | None, str]]] = {}
    writers: dict[str, list[str]] = {}
    for p in procs:
        read_here: dict[str, int | None] = {}
        for port in p.inputs:
            if undeclared(port.channel, port.line, "input"):
                continue
            if port.channel in read_here:
                report.error(f'process "{p.name}" reads channel "{port.channel}" twice (lines '
                             f"{read_here[port.channel]} and {port.line})",
                             "read each channel once; to get two copies, fan out with a <mux>",
                             line=port.line, element="input")
                continue
            read_here[port.channel] = port.line
            readers.setdefault(port.channel, []).append((p.name, port.line, "input"))
        written_here: dict[str, int | None] = {}
        for port in p.outputs:
            if undeclared(port.channel, port.line, "output"):
                continue
            if port.channel in read_here:
                report.error(f'process "{p.name}" reads and writes the same channel "{port.channel}"',
                             "write to another channel; a process cannot feed itself",
                             line=port.line, element="output")
                continue
            if port.channel in written_here:
                report.error(f'process "{p.name}" writes channel "{port.channel}" twice (lines '
                             f"{written_here[port.channel]} and {port.line})",
                             "keep one <output> per channel", line=port.line, element="output")
                continue
            written_here[port.channel] = port.line
            writers.setdefault(port.channel, []).append(p.name)
    for m in muxes:
        bad = {c for c in m.sources + m.targets if undeclared(c, m.line, "mux")}
        targets = set(m.targets)
        both = [c for c in m.sources if c in targets]
        if both:
            report.error(f'{m.name} both reads and writes channel "{both[0]}": every item would '
                         "loop back into it forever", f"remove \"{both[0]}\" from to=",
                         line=m.line, element="mux")
        for c in m.sources:
            if c not in bad and c not in both:
                readers.setdefault(c, []).append((m.name, m.line, "mux"))
        for c in m.targets:
            if c not in bad and c not in both:
                writers.setdefault(c, []).append(m.name)

    # one consumer per channel
    for ch, rs in readers.items():
        if len(rs) < 2:
            continue
        names = " and ".join(where(r[0]) for r in rs[:3])
        if len(rs) > 3:
            names = ", ".join(where(r[0]) for r in rs[:3]) + f" and {len(rs) - 3} more"
        targets = " ".join(f"{ch}_{r[0].replace('#', '')}" for r in rs[:3])
        report.error(f'channel "{ch}" has {len(rs)} consumers: {names}; a channel feeds exactly one '
                     "consumer (each item is taken once)",
                     f'fan out with <mux from="{ch}" to="{targets}"/> and let each consumer read its own copy',
                     line=rs[1][1], element=rs[1][2])

    # no cycle: nodes are processes and muxes, edges go through channels
    # (a channel with several consumers is an error already: link its first only,
    # so a hostile file cannot make writers x readers edges)
    edges: dict[str, dict[str, str]] = {}
    for ch in declared:
        if ch not in readers:
            continue
        r = readers[ch][0][0]
        for w in writers.get(ch, []):
            if w != r:
                edges.setdefault(w, {}).setdefault(r, ch)
    order = [p.name for p in procs] + [m.name for m in muxes]
    line_of = {p.name: p.line for p in procs}
    line_of.update({m.name: m.line for m in muxes})
    for cycle in _cycles(order, edges):
        steps = [f"{n} -> {edges[n][cycle[(i + 1) % len(cycle)]]}" for i, n in enumerate(cycle)]
        if len(steps) > 12:  # a long loop: show its two ends
            steps = steps[:6] + [f"... ({len(steps) - 10} more) ..."] + steps[-4:]
        text = " -> ".join(steps) + f" -> {cycle[0]}"
        first = cycle[0]
        report.error(f"cycle: {text}; items would go round forever, and a workflow must be a "
                     "pipeline without loops",
                     "break the loop: let one of these write to a new channel instead",
                     line=line_of[first], element="process" if first in wf.processes else "mux")

    # warnings
    used = set(readers) | set(writers)
    for m in muxes:
        used.update(m.sources + m.targets)
    for p in procs:
        used.update(port.channel for port in p.inputs + p.outputs)
    for ch in declared.values():
        if ch.name not in used:
            report.warn(f'channel "{ch.name}" is not used by any process or mux',
                        "remove it, or connect it with <input>, <output> or <mux>",
                        line=ch.line, element="channel")
    if not procs and not report.has_errors():
        report.warn("the workflow has no <process>: nothing will run",
                    'add a <process name="..." image="...">', line=workflow_line, element="workflow")
    if wf.mode == "batch" and not report.has_errors():
        _warn_dead(report, wf, writers)


def _cycles(order: list[str], edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in order:
        if start in index:
            continue
        work = [(start, iter(edges.get(start, {})))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges.get(nxt, {}))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    comps.append(comp)
    rank = {n: i for i, n in enumerate(order)}
    cycles = []
    for comp in comps:
        members = set(comp)
        start = min(comp, key=lambda n: rank.get(n, len(rank)))
        # shortest way from start back to start, inside the component (BFS)
        parent: dict[str, str] = {}
        queue = [start]
        found = None
        for node in queue:
            for nxt in edges.get(node, {}):
                if nxt not in members:
                    continue
                if nxt == start:
                    found = node
                    break
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
            if found is not None:
                break
        path = [found]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(list(reversed(path)))
    cycles.sort(key=lambda c: rank.get(c[0], 0))
    return cycles


def _warn_dead(report: Report, wf: Workflow, writers) -> None:
    """Batch mode: warn about processes that can never run.

    A channel is live if it has initial items or a live producer; a process
    runs once all its inputs are live; a mux passes life on from any source.
    (A worklist, linear in the size of the graph.)
    """
    waiting: dict[str, set[str]] = {}  # process -> inputs not yet live
    readers_of: dict[str, list[str]] = {}  # channel -> processes and muxes
    for p in wf.processes.values():
        waiting[p.name] = {port.channel for port in p.inputs}
        for ch in waiting[p.name]:
            readers_of.setdefault(ch, []).append(p.name)
    mux_by_name = {m.name: m for m in wf.muxes}
    for m in wf.muxes:
        for ch in m.sources:
            readers_of.setdefault(ch, []).append(m.name)
    live: set[str] = set()
    queue = [name for name, ch in wf.channels.items() if ch.items]
    live.update(queue)
    runnable = [name for name, ins in waiting.items() if not ins]

    def fire(node: str) -> None:
        outs = ([port.channel for port in wf.processes[node].outputs] if node in wf.processes
                else mux_by_name[node].targets)
        for ch in outs:
            if ch not in live:
                live.add(ch)
                queue.append(ch)

    fired: set[str] = set()
    for name in runnable:
        fired.add(name)
        fire(name)
    while queue:
        ch = queue.pop()
        for node in readers_of.get(ch, ()):
            if node in fired:
                continue
            if node in waiting:
                waiting[node].discard(ch)
                if waiting[node]:
                    continue
            fired.add(node)
            fire(node)
    for p in wf.processes.values():
        if p.name in fired:
            continue
        dead = next((port for port in p.inputs if port.channel not in live), None)
        if dead is None:
            continue
        producers = writers.get(dead.channel, [])
        if not producers:
            why = "has no producer and no initial items"
            fix = (f'add <item> elements to channel "{dead.channel}", connect a process\'s <output> '
                   'to it, or use mode="service" and push items')
        else:
            shown = ", ".join(producers[:3]) + (f" and {len(producers) - 3} more" if len(producers) > 3 else "")
            why = f"is only written by {shown}, which can never run either"
            fix = "give the first process of this chain some input"
        report.warn(f'process "{p.name}" can never run: its input channel "{dead.channel}" {why}',
                    fix, line=dead.line, element="input")
