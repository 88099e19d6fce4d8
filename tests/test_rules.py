"""The workflow rules on model objects, without XML and without lxml.

``flowd.rules`` (the graph), ``flowd.values`` (one attribute value),
``flowd.filerefs`` (the files a workflow names), ``flowd.problems`` (the
report) and ``flowd.limits`` are stdlib only: these tests build
``flowd.model`` objects by hand, and the first one proves that none of these
modules needs lxml.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowd import values
from flowd.errors import WorkflowError
from flowd.filerefs import FileRefs
from flowd.limits import MAX_GLOBS, MAX_PROBLEMS, MIN_MEMORY
from flowd.model import Channel, InitialItem, Mux, Port, Process, Workflow
from flowd.problems import Invalid, Report
from flowd.rules import check_graph

ROOT = Path(__file__).resolve().parent.parent


def proc(name, inputs=(), outputs=(), line=None) -> Process:
    """A process reading and writing the named channels; ports on the lines after its own."""
    line = line or 1
    ins = [Port(c, c, line + 1 + i) for i, c in enumerate(inputs)]
    outs = [Port(c, c, line + 1 + len(ins) + i) for i, c in enumerate(outputs)]
    return Process(name=name, image="busybox:1.36", script="true", inputs=ins, outputs=outs, line=line)


def workflow(channels, processes=(), muxes=(), mode="batch", items=()) -> Workflow:
    chans = {c: Channel(c, [InitialItem(text="x", line=i + 1)] if c in items else [], line=i + 1)
             for i, c in enumerate(channels)}
    return Workflow(name="w", mode=mode, channels=chans,
                    processes={p.name: p for p in processes}, muxes=list(muxes), source="wf.xml")


def check(wf: Workflow, workflow_line: int | None = 1) -> tuple[list, list]:
    """(errors, warnings) of the graph rules, each as (line, element, message, fix)."""
    report = Report("wf.xml")
    check_graph(wf, report, workflow_line)
    as_tuples = [[(p.line, p.element, p.message, p.fix) for p in bucket]
                 for bucket in (report.errors, report.warnings)]
    return as_tuples[0], as_tuples[1]


def test_the_rules_import_and_run_without_lxml():
    code = r"""
import json, sys
sys.modules["lxml"] = None  # any import of lxml now fails
from flowd import filerefs, limits, problems, rules, values
from flowd.model import Channel, Port, Process, Workflow
wf = Workflow(name="w", channels={c: Channel(c, line=i) for i, c in enumerate("ab")},
              processes={"p": Process("p", "busybox", "true", inputs=[Port("a", "a", 5)],
                                      outputs=[Port("b", "b", 6)], line=4),
                         "q": Process("q", "busybox", "true", inputs=[Port("b", "b", 8)],
                                      outputs=[Port("a", "a", 9)], line=7)})
report = problems.Report("wf.xml")
rules.check_graph(wf, report, 1)
assert values.process_attr("memory", "256m") == 256 * 1024 * 1024
loaded = sorted(m for m, mod in sys.modules.items()
                if (m == "lxml" or m.startswith("lxml.")) and mod is not None)
print(json.dumps({"errors": [str(p) for p in report.errors], "lxml": loaded}))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=str(ROOT), timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["lxml"] == []
    assert out["errors"] == [
        "wf.xml:4: error: <process>: cycle: p -> b -> q -> a -> p; items would go round forever, and a "
        "workflow must be a pipeline without loops (fix: break the loop: let one of these write "
        "to a new channel instead)"]


def test_a_pipeline_breaks_no_rule():
    wf = workflow(["a", "b", "c"], [proc("p", ["a"], ["b"], 10), proc("q", ["b"], ["c"], 20)], items=["a"])
    assert check(wf) == ([], [])


def test_an_undeclared_channel_is_named_with_the_closest_declared_one():
    wf = workflow(["counts"], [proc("p", ["count"], [], 10)])
    errors, _ = check(wf)
    assert errors == [(11, "input", 'channel "count" is not declared; did you mean "counts"?',
                       'declare it with <channel name="count"/>')]


def test_a_channel_name_that_is_no_name_gets_no_declare_hint():
    wf = workflow(["a"], [proc("p", ["a"], ["1 bad"], 10)])
    errors, _ = check(wf)
    assert errors == [(12, "output", 'channel "1 bad" is not declared', "name a declared channel")]


def test_a_process_reads_and_writes_each_channel_once_and_never_both_ways():
    p = proc("p", ["a", "a"], ["b", "b", "a"], 10)
    errors, _ = check(workflow(["a", "b"], [p]))
    assert [(line, element, msg) for line, element, msg, _ in errors] == [
        (12, "input", 'process "p" reads channel "a" twice (lines 11 and 12)'),
        (14, "output", 'process "p" writes channel "b" twice (lines 13 and 14)'),
        (15, "output", 'process "p" reads and writes the same channel "a"'),
    ]


def test_a_channel_with_two_consumers_is_an_error_at_the_second_with_a_mux_fix():
    wf = workflow(["a", "b", "c"], [proc("p", ["a"], ["b"], 10), proc("q", ["a"], ["c"], 20)], items=["a"])
    errors, _ = check(wf)
    assert errors == [(21, "input",
                       'channel "a" has 2 consumers: process "p" (line 10) and process "q" (line 20); '
                       "a channel feeds exactly one consumer (each item is taken once)",
                       'fan out with <mux from="a" to="a_p a_q"/> and let each consumer read its own copy')]


def test_a_mux_that_reads_what_it_writes_is_an_error():
    wf = workflow(["a", "b"], [proc("p", ["b"], [], 10)], [Mux("mux#1", ["a"], ["a", "b"], line=30)], items=["a"])
    errors, _ = check(wf)
    assert errors == [(30, "mux", 'mux#1 both reads and writes channel "a": every item would loop back '
                                  "into it forever", 'remove "a" from to=')]


def test_a_cycle_through_a_mux_is_reported_once_at_its_first_node():
    wf = workflow(["a", "b", "c"], [proc("p1", ["a"], ["b"], 10), proc("p2", ["b"], ["c"], 20)],
                  [Mux("mux#1", ["c"], ["a"], line=30)])
    errors, _ = check(wf)
    assert [(line, element, msg.split(";")[0]) for line, element, msg, _ in errors] == [
        (10, "process", "cycle: p1 -> b -> p2 -> c -> mux#1 -> a -> p1")]


def test_warnings_an_unused_channel_and_a_process_that_can_never_run():
    wf = workflow(["a", "b", "spare"], [proc("p", ["a"], ["b"], 10)])
    errors, warnings = check(wf)
    assert errors == []
    assert warnings == [
        (3, "channel", 'channel "spare" is not used by any process or mux',
         "remove it, or connect it with <input>, <output> or <mux>"),
        (11, "input", 'process "p" can never run: its input channel "a" has no producer and no initial items',
         'add <item> elements to channel "a", connect a process\'s <output> to it, or use '
         'mode="service" and push items'),
    ]


def test_a_process_fed_only_by_dead_ones_can_never_run_either():
    wf = workflow(["a", "b", "c"], [proc("p", ["a"], ["b"], 10), proc("q", ["b"], ["c"], 20)])
    _, warnings = check(wf)
    assert [w[2] for w in warnings][1] == ('process "q" can never run: its input channel "b" is only '
                                           "written by p, which can never run either")


def test_in_service_mode_items_are_pushed_so_no_process_is_dead():
    wf = workflow(["a", "b"], [proc("p", ["a"], ["b"], 10)], mode="service")
    assert check(wf) == ([], [])


def test_a_workflow_without_processes_is_a_warning_at_the_workflow_line():
    errors, warnings = check(workflow([]), workflow_line=2)
    assert errors == []
    assert warnings == [(2, "workflow", "the workflow has no <process>: nothing will run",
                         'add a <process name="..." image="...">')]


def test_the_report_shows_at_most_max_problems_and_counts_the_rest():
    report = Report("wf.xml")
    for i in range(MAX_PROBLEMS + 5):
        report.error(f"e{i}", line=i + 1, element="process")
    report.warn("w", line=1, element="channel")
    assert not report.room()
    with pytest.raises(WorkflowError) as info:
        report.finish()
    problems = info.value.problems
    assert len(problems) == MAX_PROBLEMS + 2  # the errors shown, the warning, the count
    assert problems[-1].message == "... and 5 more errors not shown"
    ok = Report("wf.xml")
    ok.warn("w", "f", line=3, element="channel")
    assert [str(p) for p in ok.finish()] == ["wf.xml:3: warning: <channel>: w (fix: f)"]


@pytest.mark.parametrize("attr, text, value", [
    ("image", "busybox:1.36", "busybox:1.36"),
    ("lang", " python ", "python"),
    ("retries", "2", 2),
    ("parallel", "4", 4),
    ("timeout", "1.5m", 90.0),
    ("memory", "6MiB", MIN_MEMORY),
    ("cpus", "0.5", 0.5),
    ("on-failure", "continue", "continue"),
])
def test_process_values_are_read_as_flowd_uses_them(attr, text, value):
    assert values.process_attr(attr, text) == value


@pytest.mark.parametrize("attr, text, message, fix", [
    ("image", "Busybox", "the repository name must be lowercase", 'write image="busybox"'),
    ("lang", "pyhton", 'did you mean "python"?', 'write lang="python"'),
    ("parallel", "0", "it must be a whole number 1 or more", 'write parallel="4"'),
    ("parallel", "2000000", "it must be a whole number from 1 to 1000000", 'write parallel="4"'),
    ("retries", "-1", "it must be a whole number 0 or more", 'write retries="2"'),
    ("timeout", "0s", "it must be a duration more than zero", 'write timeout="90s"'),
    ("memory", "1m", "Docker refuses a memory limit below 6 MiB", 'write memory="256m"'),
    ("cpus", "nan", "it must be a decimal number more than zero", 'write cpus="0.5"'),
])
def test_a_bad_process_value_says_why_and_the_fix(attr, text, message, fix):
    with pytest.raises(Invalid) as info:
        values.process_attr(attr, text)
    assert message in info.value.message and info.value.fix == fix


def test_names_file_names_and_environment_variables():
    assert values.name("name", "word-count_2") == "word-count_2"
    with pytest.raises(Invalid) as info:
        values.name("name", "2 words")
    assert info.value.fix == 'write name="x2_words"'
    assert values.as_name("input.txt") == "input.txt"
    for bad in ("..", "a/b", ".hidden"):
        with pytest.raises(Invalid):
            values.as_name(bad)
    assert values.env_name("MY_SETTING") == "MY_SETTING"
    with pytest.raises(Invalid) as info:
        values.env_name("flowd_run")
    assert "is reserved" in info.value.message


def test_file_references_stay_inside_the_workflows_folder(tmp_path):
    base = tmp_path / "wf"
    (base / "data").mkdir(parents=True)
    (base / "data" / "a.txt").write_text("a")
    (base / "data" / "b.txt").write_text("b")
    (tmp_path / "secret.txt").write_text("s")
    (base / "data" / "link.txt").symlink_to(tmp_path / "secret.txt")
    refs = FileRefs(str(base))
    assert refs.rel_path("file", "data/./a.txt") == "data/a.txt"
    assert refs.expand_glob("data/[ab].txt") == ["data/a.txt", "data/b.txt"]
    for value, why in [("/etc/passwd", "is an absolute path"), ("../secret.txt", 'with ".."'),
                       ("data/link.txt", "leads outside the workflow's folder"),
                       ("data", "is a folder, not a file"), ("data/none.txt", "no such file")]:
        with pytest.raises(Invalid) as info:
            refs.rel_path("file", value)
        assert why in info.value.message, value
    with pytest.raises(Invalid) as info:
        refs.expand_glob("data/*.txt")  # also matches the link to the outside
    assert "leads outside the workflow's folder through a symbolic link" in info.value.message


def test_globs_per_workflow_are_bounded(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    refs = FileRefs(str(tmp_path))
    for _ in range(MAX_GLOBS):
        assert refs.expand_glob("*.txt") == ["a.txt"]
    with pytest.raises(Invalid) as info:
        refs.expand_glob("*.txt")
    assert f"more than {MAX_GLOBS} <items glob=...>" in info.value.message
    assert refs.expand_glob("*.txt") == []  # said once
