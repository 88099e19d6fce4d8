"""flowd.dot: a workflow (or a run, with live depths) as a Graphviz DOT graph.

The DOT text is read back with a small reader of the statements to_dot
writes, so the tests check nodes, labels and edges, not string fragments.
When the ``dot`` binary (Debian package graphviz) is installed, Graphviz
itself must accept every graph; without it that part is skipped, also under
CI: Graphviz is an optional tool for users, not part of flowd.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flowd.dot import quote, reply_to_dot, to_dot
from flowd.model import Channel, InitialItem, Mux, Port, Process, Workflow
from flowd.parser import load_workflow

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(REPO.glob("examples/*/workflow.xml")) + sorted(
    (REPO / "tests" / "data" / "valid").glob("*.xml"))
IDS = [str(p.relative_to(REPO)) for p in WORKFLOWS]

_STR = r'"((?:[^"\\]|\\.)*)"'
_NODE_RE = re.compile(rf"^\s*{_STR}\s*(\[.*\])?;$")
_EDGE_RE = re.compile(rf"^\s*{_STR}\s*->\s*{_STR}\s*(\[.*\])?;$")
_ATTR_RE = re.compile(rf"(\w+)={_STR}")


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), s)


def _attrs(text: str | None) -> dict[str, str]:
    return {k: _unescape(v) for k, v in _ATTR_RE.findall(text or "")}


def read_dot(text: str):
    """(graph name, {node id: attrs}, [(from, to, attrs)]) of to_dot's output."""
    lines = text.splitlines()
    head = re.match(rf"^digraph {_STR} {{$", lines[0])
    assert head, lines[0]
    assert lines[-1] == "}" and text.endswith("}\n")
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str, dict[str, str]]] = []
    for line in lines[1:-1]:
        if not line.strip() or line.strip().startswith("//") or \
                re.match(r"^\s*(graph|node|edge) \[", line):
            continue
        m = _EDGE_RE.match(line)
        if m:
            edges.append((_unescape(m.group(1)), _unescape(m.group(2)), _attrs(m.group(3))))
            continue
        m = _NODE_RE.match(line)
        assert m, f"unexpected DOT line: {line!r}"
        node = _unescape(m.group(1))
        assert node not in nodes, f"node {node} declared twice"
        nodes[node] = _attrs(m.group(2))
    for a, b, _ in edges:
        assert a in nodes and b in nodes, (a, b)
    return _unescape(head.group(1)), nodes, edges


def _graph_label(text: str) -> str:
    m = re.search(rf"^\s*graph \[label={_STR}", text, re.M)
    return _unescape(m.group(1))


@pytest.fixture(scope="module", params=WORKFLOWS, ids=IDS)
def loaded(request):
    wf, _ = load_workflow(request.param)
    return wf


def test_every_process_channel_and_mux_is_a_node(loaded):
    wf = loaded
    name, nodes, edges = read_dot(to_dot(wf))
    assert name == wf.name
    assert {n for n in nodes if n.startswith("p:")} == {f"p:{p}" for p in wf.processes}
    assert {n for n in nodes if n.startswith("c:")} == {f"c:{c}" for c in wf.channels}
    assert {n for n in nodes if n.startswith("m:")} == {f"m:{i}" for i in range(1, len(wf.muxes) + 1)}
    assert len(nodes) == len(wf.processes) + len(wf.channels) + len(wf.muxes)
    for p in wf.processes.values():
        label = nodes[f"p:{p.name}"]["label"].split("\n")
        assert label[:2] == [p.name, p.image]
        assert nodes[f"p:{p.name}"]["shape"] == "box"
    for i, m in enumerate(wf.muxes, 1):
        assert nodes[f"m:{i}"]["label"] == m.name
    results = set(wf.result_channels())
    for c in wf.channels:
        label = nodes[f"c:{c}"]["label"].split("\n")
        assert label[0] == c
        assert (nodes[f"c:{c}"].get("peripheries") == "2") == (c in results)
    # one edge per input, output, mux source and mux target
    ports = sum(len(p.inputs) + len(p.outputs) for p in wf.processes.values())
    assert len(edges) == ports + sum(len(m.sources) + len(m.targets) for m in wf.muxes)


def test_the_same_workflow_gives_the_same_text_and_survives_the_daemons_json(loaded):
    wf = loaded
    again = Workflow.from_dict(json.loads(json.dumps(loaded.to_dict())))
    assert to_dot(wf) == to_dot(wf) == to_dot(again)
    depths = {c: i for i, c in enumerate(wf.channels)}
    assert to_dot(wf, depths, "r (running)") == to_dot(again, dict(depths), "r (running)")


def test_wordcount_edges_show_the_merge_the_fan_out_and_as_names():
    wf, _ = load_workflow(REPO / "examples" / "wordcount" / "workflow.xml")
    _, nodes, edges = read_dot(to_dot(wf))
    got = {(a, b, e.get("label")) for a, b, e in edges}
    assert got == {
        ("c:prose", "m:1", None), ("c:poems", "m:1", None), ("m:1", "c:lines", None),  # merge
        ("c:lines", "p:count", None), ("p:count", "c:counts", None),
        ("c:counts", "m:2", None), ("m:2", "c:to_report", None), ("m:2", "c:tally", None),  # fan-out
        ("c:to_report", "p:report", "n.txt"), ("p:report", "c:report", "line.txt"),
    }
    assert len(edges) == len(got)
    assert nodes["c:prose"]["label"] == "prose\n2 initial items"
    assert nodes["c:poems"]["label"] == "poems\n2 initial items"
    assert nodes["c:lines"]["label"] == "lines"
    assert nodes["c:tally"]["label"] == "tally\nresult" and nodes["c:tally"]["peripheries"] == "2"
    assert nodes["m:1"]["label"] == "mux#1" and nodes["m:1"]["shape"] == "diamond"
    assert nodes["p:count"]["label"] == "count\nflowd/busybox\ntimeout 1m"


def test_process_labels_name_the_settings_that_are_not_defaults():
    wf, _ = load_workflow(REPO / "tests" / "data" / "valid" / "defaults.xml")
    _, nodes, _ = read_dot(to_dot(wf))
    assert nodes["p:double"]["label"] == (
        "double\nalpine:3.19\nlang bash, parallel 4, retries 1, timeout 5m, on-failure continue")
    assert nodes["p:own"]["label"] == "own\nbusybox:1.36\ntimeout 250ms"
    wf, _ = load_workflow(REPO / "tests" / "data" / "valid" / "service.xml")
    text = to_dot(wf)
    _, nodes, _ = read_dot(text)
    assert nodes["p:thumb"]["label"] == "thumb\npython:3.12-slim\nlang python, parallel 8, timeout 90m"
    assert _graph_label(text) == "workflow resize (service)"


def test_live_depths_replace_initial_item_counts_and_the_title_is_shown():
    wf, _ = load_workflow(REPO / "examples" / "wordcount" / "workflow.xml")
    depths = {"prose": 0, "poems": 0, "lines": 2, "counts": 0, "to_report": 1, "tally": 4,
              "report": 3}
    text = to_dot(wf, depths, title="3f9c2a71d0be (running)")
    _, nodes, _ = read_dot(text)
    for ch, n in depths.items():
        assert nodes[f"c:{ch}"]["label"].split("\n")[0] == f"{ch} ({n})"
        assert (nodes[f"c:{ch}"].get("style") == "filled") == (n > 0)
    assert "initial" not in text
    assert nodes["c:tally"]["label"] == "tally (4)\nresult"
    assert _graph_label(text) == "workflow wordcount\n3f9c2a71d0be (running)"
    # a channel the daemon gave no depth for is drawn without one
    _, nodes, _ = read_dot(to_dot(wf, {"lines": 5}))
    assert nodes["c:lines"]["label"] == "lines (5)" and nodes["c:prose"]["label"] == "prose"


def test_the_daemons_graph_answer_becomes_dot():
    wf, _ = load_workflow(REPO / "examples" / "join" / "workflow.xml")
    reply = json.loads(json.dumps({"run": "3f9c2a71d0be", "state": "succeeded",
                                   "workflow": wf.to_dict(),
                                   "depths": {"names": 0, "greetings": 0, "messages": 3}}))
    text = reply_to_dot(reply)
    assert text == to_dot(wf, reply["depths"], title="3f9c2a71d0be (succeeded)")
    _, nodes, _ = read_dot(text)
    assert nodes["c:messages"]["label"] == "messages (3)\nresult"


def _clash() -> Workflow:
    """A process, a channel and a mux-looking name all called "x"."""
    return Workflow(
        name="clash",
        channels={"x": Channel("x", [InitialItem(text="1")]), "y": Channel("y"), "z": Channel("z")},
        processes={"x": Process("x", "busybox", "cp x y", inputs=[Port("x", "x")],
                                outputs=[Port("y", "y")])},
        muxes=[Mux("mux#1", ["y"], ["z"])],
    )


def test_a_process_and_a_channel_with_the_same_name_are_distinct_nodes():
    _, nodes, edges = read_dot(to_dot(_clash()))
    assert set(nodes) == {"p:x", "c:x", "c:y", "c:z", "m:1"}
    assert nodes["c:x"]["label"] == "x\n1 initial item"
    assert nodes["p:x"]["label"] == "x\nbusybox"
    assert {(a, b) for a, b, _ in edges} == {("c:x", "p:x"), ("p:x", "c:y"), ("c:y", "m:1"),
                                            ("m:1", "c:z")}


def test_quotes_backslashes_and_line_breaks_in_labels_are_escaped():
    assert quote('a "b" \\c\nd') == '"a \\"b\\" \\\\c\\nd"'
    assert quote("tab\there\x00\x1b") == '"tab here"'
    wf = _clash()
    wf.name = 'evil" -> "p:x'
    wf.processes["x"].image = 'img"\\n'
    text = to_dot(wf, title='run "1" \\ (running)')
    name, nodes, edges = read_dot(text)  # still five nodes and four edges: nothing leaked out
    assert name == 'evil" -> "p:x'
    assert len(nodes) == 5 and len(edges) == 4
    assert nodes["p:x"]["label"] == 'x\nimg"\\n'
    assert _graph_label(text) == 'workflow evil" -> "p:x\nrun "1" \\ (running)'


def test_a_channel_named_but_not_declared_is_drawn_not_dropped():
    wf = _clash()
    wf.processes["x"].outputs.append(Port("ghost", "ghost"))
    _, nodes, edges = read_dot(to_dot(wf))
    assert nodes["c:ghost"]["style"] == "dashed"
    assert ("p:x", "c:ghost") in {(a, b) for a, b, _ in edges}


def test_an_empty_workflow_is_still_a_graph():
    name, nodes, edges = read_dot(to_dot(Workflow(name="empty")))
    assert name == "empty" and nodes == {} and edges == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_graphviz_accepts_the_output(path):
    dot = shutil.which("dot")
    if dot is None:  # optional, also under CI: Graphviz is the user's tool, not flowd's
        pytest.skip("Graphviz's dot is not installed (apt-get install graphviz)")
    wf, _ = load_workflow(path)
    graphs = [to_dot(wf), to_dot(wf, {c: 1 for c in wf.channels}, title='r "1" (running)')]
    for text in graphs:
        proc = subprocess.run([dot, "-Tsvg"], input=text.encode(), capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        svg = html.unescape(proc.stdout.decode())  # dot writes "-" as &#45;
        assert "<svg" in svg
        for p in wf.processes:  # every process is drawn
            assert f">{p}</text>" in svg


def test_graphviz_accepts_escaped_labels():
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip("Graphviz's dot is not installed (apt-get install graphviz)")
    wf = _clash()
    wf.name = 'evil" -> "p:x \\'
    proc = subprocess.run([dot, "-Tsvg"], input=to_dot(wf, title='a "b"\nc').encode(),
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
