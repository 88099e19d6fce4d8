"""Tests of flowd.parser: the workflow XML format, its checks and hostile files.

Corpus: tests/data/valid/*.xml must load; every tests/data/invalid/*.xml
carries its expectation in a comment, e.g.

    <!-- expect: line=7 element=input text="not declared" schema=reject -->

meaning: loading raises WorkflowError with a problem at line 7, on element
<input>, whose text contains "not declared"; ``schema=reject`` also asserts
that the RelaxNG schema alone rejects the file (the schema and the Python
checks agree). ``line=none``/``element=none`` mean the problem has none.
"""
from __future__ import annotations

import json
import os
import re
import resource
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowd import parser
from flowd.errors import Problem, WorkflowError
from flowd.model import Workflow
from flowd.limits import MAX_PROBLEMS, MAX_XML_BYTES
from flowd.parser import load_workflow

DATA = Path(__file__).parent / "data"
VALID = DATA / "valid"
INVALID = DATA / "invalid"
MiB = 1024 * 1024

EXPECT_RE = re.compile(rb"<!-- expect: (.*?) -->")
FIELD_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def problems_of(path) -> list[Problem]:
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    problems = info.value.problems
    assert problems, "a WorkflowError must list at least one problem"
    return problems


def write(folder: Path, text: str | bytes, name: str = "wf.xml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def proc(name="p", inputs=(), outputs=(), extra=""):
    ports = "".join(f'<input channel="{c}"/>' for c in inputs)
    ports += "".join(f'<output channel="{c}"/>' for c in outputs)
    return f'<process name="{name}" image="busybox:1.36"{extra}>{ports}<script>true</script></process>'


# -- the valid corpus ----------------------------------------------------------------

def test_spec_example_loads_into_the_model():
    wf, warnings = load_workflow(VALID / "wordcount.xml")
    assert warnings == []
    assert wf.name == "wordcount" and wf.mode == "batch"
    assert wf.description == "Count words in each line, then sum."
    assert list(wf.channels) == ["lines", "counts", "to_sum", "to_log", "total"]
    items = wf.channels["lines"].items
    assert [(i.text, i.file) for i in items] == [
        ("the quick brown fox", None),
        (None, "data/more.txt"),
        # <items glob="data/*.txt"/>: regular files only, sorted by name,
        # not data/notes.md, not data/sub/deep.txt
        (None, "data/a.txt"),
        (None, "data/b.txt"),
        (None, "data/c.txt"),
        (None, "data/more.txt"),
    ]
    assert [i.line for i in items] == [7, 8, 9, 9, 9, 9]

    count = wf.processes["count"]
    assert count.image == "busybox:1.36"
    assert count.script == "wc -w < lines > counts"
    assert count.lang == "sh" and count.retries == 0 and count.parallel == 1
    assert count.timeout is None and count.memory is None and count.cpus is None
    assert count.network == "none" and count.on_failure == "stop"
    assert [(p.channel, p.as_name) for p in count.inputs] == [("lines", "lines")]
    assert [(p.channel, p.as_name) for p in count.outputs] == [("counts", "counts")]
    assert count.line == 16

    total = wf.processes["sum"]
    assert total.lang == "python" and total.retries == 2
    assert total.timeout == 30.0 and total.memory == 256 * MiB and total.cpus == 0.5
    assert [(p.channel, p.as_name) for p in total.inputs] == [("to_sum", "n.txt")]
    assert total.script_file == "scripts/sum.py"
    assert total.script == (VALID / "scripts/sum.py").read_text()

    assert len(wf.muxes) == 1
    mux = wf.muxes[0]
    assert (mux.name, mux.sources, mux.targets, mux.line) == ("mux#1", ["counts"], ["to_sum", "to_log"], 22)
    assert wf.result_channels() == ["to_log", "total"]
    assert wf.files() == ["data/a.txt", "data/b.txt", "data/c.txt", "data/more.txt", "scripts/sum.py"]
    assert Workflow.from_dict(json.loads(json.dumps(wf.to_dict()))) == wf


def test_defaults_apply_to_every_process_that_does_not_override():
    wf, warnings = load_workflow(VALID / "defaults.xml")
    assert warnings == []
    assert wf.description == "Every process takes these values unless it sets its own."
    d = wf.processes["double"]
    assert (d.image, d.lang, d.retries, d.timeout, d.memory, d.cpus, d.parallel, d.network, d.on_failure) == (
        "alpine:3.19", "bash", 1, 300.0, 1024 * MiB, 2.0, 4, "bridge", "continue")
    assert d.env == {"FACTOR": "2", "EMPTY": ""}
    assert [(p.channel, p.as_name) for p in d.inputs] == [("numbers", "n")]
    own = wf.processes["own"]
    assert (own.image, own.lang, own.retries, own.timeout, own.memory, own.cpus, own.parallel,
            own.network, own.on_failure) == (
        "busybox:1.36", "sh", 0, 0.25, 6 * MiB, 0.25, 1, "none", "stop")
    assert d.placement == ["node.role==worker", "node.labels.disk==ssd"]  # from <defaults>
    assert own.placement == ["node.hostname!=old-1"]  # its own, spaces around == dropped


def test_placement_constraints_reach_the_task_spec_for_swarm():
    from types import SimpleNamespace
    from flowd.taskspec import Limits, task_spec
    from flowd.taskstore import TaskRecord
    wf, _ = load_workflow(VALID / "defaults.xml")
    store = SimpleNamespace(input_path=lambda rec, seq: f"/in/{seq}", path=lambda *a: "/s",
                            task_path=lambda rec, what: "/w", log_path=lambda rec, n: "/l")
    run = SimpleNamespace(wf=wf, store=store, user=None, id="r1", group_add=[], limits=Limits())
    rec = TaskRecord(dirname="1", kind="process", name="own", task_id="1", inputs=[], attempt=1)
    assert task_spec(run, rec).placement == ["node.hostname!=old-1"]


def test_inline_items_are_kept_byte_for_byte():
    wf, _ = load_workflow(VALID / "text.xml")
    texts = [i.text for i in wf.channels["raw"].items]
    assert texts == [
        "  two leading spaces and a trailing tab\t",
        "\nline one\n  line two\n",
        "<not a tag> & not an entity",  # CDATA
        "a & b < c > d \"e\" 'f' \u00e9\u263a",  # predefined entities and char refs
        "",  # <item/>: an empty item (0 bytes)
        "",
        " ",
        "mixed <cdata> and text end",  # comments are not part of the text
        "unicode: héllo wörld ✓",
    ]
    assert all(i.file is None for i in wf.channels["raw"].items)


def test_line_ends_follow_xml_rules(tmp_path):
    # XML turns CR LF into LF while parsing; a CR the item needs is written &#13;
    path = write(tmp_path, b'<workflow name="w"><channel name="c"><item>a\r\nb</item>'
                           b"<item>a&#13;\nb</item></channel>" + proc(inputs=["c"]).encode() + b"</workflow>")
    wf, _ = load_workflow(path)
    assert [i.text for i in wf.channels["c"].items] == ["a\nb", "a\r\nb"]


def test_mux_names_and_channel_lists():
    wf, warnings = load_workflow(VALID / "mux.xml")
    assert warnings == []
    assert [(m.name, m.sources, m.targets) for m in wf.muxes] == [
        ("mux#1", ["a"], ["a1", "a2", "a3"]),  # fan-out
        ("mux#2", ["a1", "b"], ["merged"]),  # merge (any white space separates)
        ("mux#3", ["a2", "a3"], ["x", "y"]),  # many to many
    ]
    assert wf.consumers()["a"] == "mux#1"
    assert wf.producers()["merged"] == ["mux#2"]


def test_service_mode_and_inline_script_indentation_removed():
    wf, warnings = load_workflow(VALID / "service.xml")
    assert wf.mode == "service"
    assert warnings == []  # no "can never run" warning in service mode
    thumb = wf.processes["thumb"]
    assert thumb.timeout == 5400.0 and thumb.memory == 512 * MiB and thumb.cpus == 1.5
    assert thumb.parallel == 8 and thumb.network == "bridge"
    assert [(p.channel, p.as_name) for p in thumb.inputs + thumb.outputs] == [
        ("uploads", "in.jpg"), ("thumbs", "out.jpg")]
    # the common indentation is removed so the Python runs as written
    assert thumb.script == '\nimport shutil\nif True:\n    shutil.copy("in.jpg", "out.jpg")\n'
    compile(thumb.script, "script", "exec")


def test_minimal_one_line_file():
    wf, warnings = load_workflow(VALID / "minimal.xml")
    assert list(wf.processes) == ["hello"] and warnings == []
    assert wf.processes["hello"].inputs == []


def test_problem_file_is_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '<workflow name="w">\n<process name="p"><script>x</script></process></workflow>', "sub/wf.xml")
    problems = problems_of("sub/wf.xml")
    assert {p.file for p in problems} == {"sub/wf.xml"}
    assert str(problems[0]).startswith("sub/wf.xml:2: error: <process>: ")
    problems = problems_of(Path("sub") / "wf.xml")  # os.PathLike works too
    assert problems[0].file == "sub/wf.xml"


# -- the invalid corpus ----------------------------------------------------------------

def _expectation(path: Path) -> dict:
    m = EXPECT_RE.search(path.read_bytes())
    assert m, f"{path.name} has no <!-- expect: ... --> comment"
    fields = dict(FIELD_RE.findall(m.group(1).decode()))
    assert {"line", "element", "text"} <= set(fields), path.name
    text = fields["text"]
    return {
        "line": None if fields["line"] == "none" else int(fields["line"]),
        "element": None if fields["element"] == "none" else fields["element"],
        "text": json.loads(text) if text.startswith('"') else text,
        "schema": fields.get("schema"),
    }


INVALID_FILES = sorted(INVALID.glob("*.xml"))


def test_the_invalid_corpus_is_there():
    assert len(INVALID_FILES) >= 70


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.name)
def test_invalid_corpus(path):
    want = _expectation(path)
    problems = problems_of(path)
    errors = [p for p in problems if p.severity == "error"]
    assert errors
    matching = [p for p in errors
                if p.line == want["line"] and p.element == want["element"] and want["text"] in str(p)]
    assert matching, "\n".join(str(p) for p in problems)
    for p in problems:  # every problem is complete and printable on one line
        assert p.file == str(path) and p.message
        assert p.line is None or p.line >= 1
        assert "\n" not in str(p)
    assert any(p.fix for p in matching), "the problem says how to fix it"


def test_error_format_matches_the_documented_example():
    problems = problems_of(INVALID / "retries_negative.xml")
    assert [str(p) for p in problems] == [
        f"{INVALID / 'retries_negative.xml'}:4: error: <process>: attribute \"retries\" is \"-1\"; "
        'it must be a whole number 0 or more (fix: write retries="2")'
    ]


def test_the_schema_accepts_every_valid_file():
    for path in sorted(VALID.glob("*.xml")):
        root = parser._parse_xml(path.read_bytes(), str(path))
        assert parser._schema_problems(root, str(path)) == [], path.name


@pytest.mark.parametrize("path", [p for p in INVALID_FILES if b"schema=reject" in p.read_bytes()],
                         ids=lambda p: p.name)
def test_the_schema_alone_rejects_malformed_files(path):
    root = parser._parse_xml(path.read_bytes(), str(path))
    problems = parser._schema_problems(root, str(path))
    assert problems and all(p.line and p.element for p in problems)


def test_schema_errors_are_translated_into_friendly_problems():
    def schema(text):
        root = parser._parse_xml(text.encode(), "wf.xml")
        return [str(p) for p in parser._schema_problems(root, "wf.xml")]

    out = schema('<workflow name="w">\n<channel name="a"/>\n<frob/>\n</workflow>')
    assert out[0].startswith("wf.xml:3: error: <frob>: element <frob> is not allowed here")
    out = schema('<workflow name="w">\n<process name="p">\n<input channel="a"/></process>\n</workflow>')
    assert out[0].startswith("wf.xml:2: error: <process>: a required element is missing here")
    out = schema('<workflow name="w">\n<channel name="a">\n<item>x<frob/></item></channel>\n</workflow>')
    assert out[0].startswith("wf.xml:3: error: <frob>: unknown or misplaced element <frob> inside <item>")
    out = schema('<workflow name="w">\n<process name="p" retry="2"><script>x</script></process></workflow>')
    assert out[0].startswith('wf.xml:2: error: <process>: attribute "retry" is not allowed here')
    out = schema('<workflow name="w">\n<channel/>\n</workflow>')
    assert out[0].startswith("wf.xml:2: error: <channel>: a required attribute is missing")
    out = schema('<flow name="w"/>')
    assert out == ["wf.xml:1: error: <flow>: expected <workflow> here, found <flow> "
                   "(fix: compare with the workflow format (docs/format.md; installed as "
                   "/usr/share/doc/flowd/format.md))"]


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    path = write(tmp_path, """<workflow name="w">
  <channel name="a"><item>x</item></channel>
  <channel name="a"/>
  <process name="p" image="busybox:1.36" retry="1" timeout="soon">
    <input channel="b"/>
    <script>true</script>
  </process>
  <process name="q" image="busybox:1.36" memory="1m">
    <env name="FLOWD_X" value="1"/>
  </process>
  <mux from="a" to="nowhere"/>
</workflow>
""")
    errors = [(p.line, p.element) for p in problems_of(path) if p.severity == "error"]
    assert (3, "channel") in errors  # declared twice
    assert errors.count((4, "process")) == 2  # unknown attribute, bad timeout
    assert (5, "input") in errors  # b not declared
    assert errors.count((8, "process")) == 2  # memory too small, no script
    assert (9, "env") in errors  # reserved name
    assert (11, "mux") in errors  # nowhere not declared
    lines = [p.line or 0 for p in problems_of(path)]
    assert lines == sorted(lines), "problems come in file order"


def test_the_number_of_problems_is_capped(tmp_path):
    body = "".join(f'<process name="p{i}" image="x" retries="-1"><script>x</script></process>\n'
                   for i in range(500))
    problems = problems_of(write(tmp_path, f'<workflow name="w">\n{body}</workflow>'))
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1].message == "... and 300 more errors not shown"


# -- graph rules and warnings -------------------------------------------------------------

def test_cycle_message_names_the_cycle():
    problems = problems_of(INVALID / "cycle.xml")
    cycle = [p for p in problems if "cycle:" in p.message]
    assert len(cycle) == 1
    assert cycle[0].message.startswith("cycle: count -> counts -> sum -> total -> count;")


def test_every_independent_cycle_is_reported(tmp_path):
    chans = "".join(f'<channel name="{c}"/>' for c in "abcdefg")
    path = write(tmp_path, f"""<workflow name="w">{chans}
{proc("p1", ["a"], ["b"])}
{proc("p2", ["b"], ["c"])}
<mux from="c" to="a"/>
{proc("q1", ["d"], ["e"])}
{proc("q2", ["e"], ["d"])}
{proc("r", ["f"], ["g"])}
</workflow>""")
    messages = sorted(p.message.split(";")[0] for p in problems_of(path) if "cycle" in p.message)
    assert messages == ["cycle: p1 -> b -> p2 -> c -> mux#1 -> a -> p1", "cycle: q1 -> e -> q2 -> d -> q1"]


def test_a_long_chain_loads_fast_and_a_long_cycle_is_reported_short(tmp_path):
    n = 3000
    chans = "".join(f'<channel name="c{i}"/>\n' for i in range(n + 1))
    procs = "".join(proc(f"p{i}", [f"c{i}"], [f"c{i + 1}"]) + "\n" for i in range(n))
    path = write(tmp_path, f'<workflow name="w">\n{chans}{procs}</workflow>')
    assert path.stat().st_size < MAX_XML_BYTES
    start = time.monotonic()
    wf, warnings = load_workflow(path)
    assert time.monotonic() - start < 5.0  # about 0.3 s
    assert len(wf.processes) == n
    # nothing feeds c0: the first process can never run, and so none can
    assert len(warnings) == MAX_PROBLEMS + 1
    assert warnings[0].message.startswith('process "p0" can never run: its input channel "c0" has no producer')
    assert warnings[-1].message == f"... and {n - MAX_PROBLEMS} more warnings not shown"
    # close the chain into one loop of 3000 processes: no recursion limit hit
    path = write(tmp_path, f'<workflow name="w">\n{chans}{procs}{proc("back", [f"c{n}"], ["c0"])}</workflow>')
    cycle = [p for p in problems_of(path) if "cycle" in p.message]
    assert len(cycle) == 1 and len(cycle[0].message) < 500
    assert cycle[0].message.startswith("cycle: p0 -> c1 -> p1 -> c2 -> ")


def test_two_consumers_message_names_both_and_suggests_a_mux():
    [p] = [p for p in problems_of(INVALID / "two_consumers.xml") if "consumers" in p.message]
    assert 'process "count" (line 6) and process "copy" (line 10)' in p.message
    assert p.fix.startswith('fan out with <mux from="lines" to="lines_count lines_copy"/>')


def test_warning_for_a_process_that_can_never_run(tmp_path):
    text = f"""<workflow name="w"{{mode}}>
  <channel name="in"/>
  <channel name="mid"/>
  <channel name="out"/>
  <channel name="spare"><item>x</item></channel>
  {proc("first", ["in"], ["mid"])}
  {proc("second", ["mid"], ["out"])}
</workflow>"""
    wf, warnings = load_workflow(write(tmp_path, text.format(mode="")))
    assert all(w.severity == "warning" for w in warnings)
    assert [str(w).split(": warning: ")[1] for w in warnings] == [
        '<channel>: channel "spare" is not used by any process or mux (fix: remove it, or connect '
        "it with <input>, <output> or <mux>)",
        '<input>: process "first" can never run: its input channel "in" has no producer and no '
        'initial items (fix: add <item> elements to channel "in", connect a process\'s <output> to '
        'it, or use mode="service" and push items)',
        '<input>: process "second" can never run: its input channel "mid" is only written by '
        "first, which can never run either (fix: give the first process of this chain some input)",
    ]
    assert [w.line for w in warnings] == [5, 6, 7]
    # in service mode items can be pushed later: only the unused channel is worth a word
    wf, warnings = load_workflow(write(tmp_path, text.format(mode=' mode="service"')))
    assert [w.element for w in warnings] == ["channel"]


def test_warnings_are_listed_with_errors_when_the_file_is_rejected(tmp_path):
    path = write(tmp_path, f'<workflow name="w"><channel name="x"/><channel name="x"/>{proc()}</workflow>')
    severities = sorted(p.severity for p in problems_of(path))
    assert severities == ["error", "warning"]


# -- paths ---------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    """tmp/wf/ (the workflow's folder, with data/) and tmp/secret.txt outside it."""
    wf = tmp_path / "wf"
    (wf / "data").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "c.txt", ".hidden.txt"):
        (wf / "data" / name).write_text(name)
    (wf / "data" / "dir.txt").mkdir()  # a folder that matches the glob
    (tmp_path / "secret.txt").write_text("TOP-SECRET-7f3a")
    return wf


def items_wf(inner: str) -> str:
    return f'<workflow name="w"><channel name="c">{inner}</channel>{proc(inputs=["c"])}</workflow>'


def test_glob_expands_to_regular_files_sorted_by_name(folder):
    wf, _ = load_workflow(write(folder, items_wf('<items glob="data/*.txt"/><item file="./data//a.txt"/>')))
    assert [i.file for i in wf.channels["c"].items] == ["data/a.txt", "data/b.txt", "data/c.txt", "data/a.txt"]


def test_a_glob_that_matches_nothing_is_an_error(folder):
    [p] = [p for p in problems_of(write(folder, items_wf('\n<items glob="data/*.csv"/>')))
           if p.severity == "error"]
    assert (p.line, p.element) == (2, "items")
    assert 'glob="data/*.csv" matches no file' in p.message and p.fix


@pytest.mark.parametrize("attr", ["item file", "items glob", "script file"])
@pytest.mark.parametrize("value, why", [
    ("../secret.txt", "goes up out of the workflow's folder"),
    ("data/../../secret.txt", "goes up out of the workflow's folder"),
    ("/etc/passwd", "is an absolute path"),
])
def test_paths_must_stay_inside_the_folder(folder, attr, value, why):
    tag, name = attr.split()
    if tag == "script":
        text = f'<workflow name="w">\n<process name="p" image="x"><script {name}="{value}"/></process></workflow>'
    else:
        text = items_wf(f'\n<{tag} {name}="{value}"/>')
    problems = problems_of(write(folder, text))
    [p] = [p for p in problems if p.severity == "error"]
    assert (p.line, p.element) == (2, tag)
    assert why in p.message and p.fix
    assert "TOP-SECRET" not in str(p)


@pytest.mark.parametrize("link_target, inner", [
    ("../../secret.txt", '<item file="data/link.txt"/>'),
    ("../../secret.txt", '<items glob="data/*.txt"/>'),
    ("../..", '<item file="data/up/secret.txt"/>'),  # a linked folder
])
def test_a_planted_symlink_pointing_outside_is_refused(folder, link_target, inner):
    name = "up" if link_target == "../.." else "link.txt"
    os.symlink(link_target, folder / "data" / name)
    problems = problems_of(write(folder, items_wf("\n" + inner)))
    [p] = [p for p in problems if p.severity == "error"]
    assert p.line == 2 and "leads outside the workflow's folder" in p.message
    assert "TOP-SECRET" not in str(p)


def test_a_symlink_to_a_script_outside_is_refused(folder):
    os.symlink(folder.parent / "secret.txt", folder / "run.sh")
    problems = problems_of(write(folder, '<workflow name="w"><process name="p" image="x">'
                                         '<script file="run.sh"/></process></workflow>'))
    assert any("leads outside" in p.message for p in problems)
    assert not any("TOP-SECRET" in str(p) for p in problems)


def test_a_symlink_that_stays_inside_is_fine(folder):
    os.symlink("a.txt", folder / "data" / "alias.txt")
    wf, _ = load_workflow(write(folder, items_wf('<item file="data/alias.txt"/>')))
    assert [i.file for i in wf.channels["c"].items] == ["data/alias.txt"]


def test_the_base_folder_is_the_workflow_files_folder(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)  # not the workflow's folder
    write(folder, items_wf('<item file="data/a.txt"/>'))
    wf, _ = load_workflow("wf/wf.xml")
    assert wf.channels["c"].items[0].file == "data/a.txt"
    assert wf.source == "wf/wf.xml"


def test_a_glob_never_follows_a_planted_folder_link_loop(folder):
    for name in ("loop1", "loop2", "loop3"):
        os.symlink(".", folder / "data" / name)  # data/loop1 -> data, etc.
    pattern = "data/" + "*/" * 30 + "a.txt"  # 3**30 paths if links were followed
    start = time.monotonic()
    [p] = [p for p in problems_of(write(folder, items_wf(f'<items glob="{pattern}"/>')))
           if p.severity == "error"]
    assert time.monotonic() - start < 1.0
    assert "matches no file" in p.message


NAME_PARTS = ["data", "a.txt", "b.txt", "..", ".", "", "link", "inlink", "dirlink", "*", "*.txt",
              "?.txt", "[ab].txt", "/", "~", "secret.txt", "nope"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """base/ with data/a.txt, data/b.txt and links: link -> ../secret.txt (outside),
    inlink -> data/a.txt (inside), dirlink -> .. (outside)."""
    root = tmp_path_factory.mktemp("planted")
    (root / "secret.txt").write_text(SENTINEL)
    base = root / "base"
    (base / "data").mkdir(parents=True)
    (base / "data" / "a.txt").write_text("a")
    (base / "data" / "b.txt").write_text("b")
    os.symlink("../secret.txt", base / "link")
    os.symlink("data/a.txt", base / "inlink")
    os.symlink("..", base / "dirlink")
    return base


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(NAME_PARTS), min_size=1, max_size=5),
       kind=st.sampled_from(["item file", "items glob", "script file"]))
def test_property_paths_are_rejected_or_resolve_inside_the_folder(planted, parts, kind):
    value = "/".join(parts)
    tag, attr = kind.split()
    quoted = escape(value, {'"': "&quot;"})
    if tag == "script":
        text = f'<workflow name="w"><process name="p" image="x"><script {attr}="{quoted}"/></process></workflow>'
    else:
        text = f'<workflow name="w"><channel name="c"><{tag} {attr}="{quoted}"/></channel>{proc(inputs=["c"])}</workflow>'
    path = write(planted, text, "prop.xml")
    try:
        wf, _ = load_workflow(path)
    except WorkflowError as exc:
        assert SENTINEL not in str(exc)
        return
    base = os.path.realpath(planted)
    names = [i.file for i in wf.channels["c"].items] if tag != "script" else [wf.processes["p"].script_file]
    assert names
    for name in names:
        assert not name.startswith("/") and ".." not in name.split("/")
        real = os.path.realpath(os.path.join(base, name))
        assert real.startswith(base + os.sep) and os.path.isfile(real)
    if tag == "script":
        assert SENTINEL not in wf.processes["p"].script


@settings(max_examples=200, deadline=None)
@given(name=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=70),
       as_name=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=130))
def test_property_names_and_as_follow_the_documented_rules(tmp_path_factory, name, as_name):
    folder = tmp_path_factory.getbasetemp()
    qn, qa = quoteattr(name), quoteattr(as_name)
    text = (f'<workflow name="w"><channel name={qn}><item>x</item></channel>'
            f'<process name="p" image="x"><input channel={qn} as={qa}/><script>x</script></process></workflow>')
    path = write(folder, text, "names.xml")
    name_ok = bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,62}", name))
    as_ok = bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", as_name))
    try:
        wf, _ = load_workflow(path)
    except WorkflowError:
        assert not (name_ok and as_ok)
        return
    assert name_ok and as_ok
    [port] = wf.processes["p"].inputs
    assert (port.channel, port.as_name) == (name, as_name)
    assert "/" not in port.as_name and port.as_name not in (".", "..")


# -- hostile files --------------------------------------------------------------------------

SENTINEL = "SENTINEL-c0ffee-do-not-leak"


@pytest.fixture
def attack(tmp_path):
    """A planted secret beside the workflow; returns (folder, secret path)."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SENTINEL + "\n")
    return tmp_path, secret


def attack_docs(secret: Path) -> dict[str, bytes]:
    url = secret.as_uri()
    lol = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    big = "A" * 50_000
    docs = {
        "external entity": f'<!DOCTYPE workflow [<!ENTITY s SYSTEM "{url}">]>'
                           f'<workflow name="w"><channel name="c"><item>&s;</item></channel></workflow>',
        "external entity, relative": '<!DOCTYPE workflow [<!ENTITY s SYSTEM "secret.txt">]>'
                                     '<workflow name="w"><description>&s;</description></workflow>',
        "entity in an attribute": f'<!DOCTYPE workflow [<!ENTITY s SYSTEM "{url}">]><workflow name="&s;"/>',
        "parameter entity": f'<!DOCTYPE workflow [<!ENTITY % p SYSTEM "{url}"> %p;]><workflow name="w"/>',
        "external DTD": f'<!DOCTYPE workflow SYSTEM "{url}"><workflow name="w"/>',
        "internal entity": '<!DOCTYPE workflow [<!ENTITY x "hello">]><workflow name="w">'
                           '<description>&x;</description></workflow>',
        "billion laughs": f'<!DOCTYPE workflow [{"".join(lol)}]><workflow name="w">'
                          '<description>&lol9;</description></workflow>',
        "quadratic blowup": f'<!DOCTYPE workflow [<!ENTITY a "{big}">]><workflow name="w"><description>'
                            + "&a;" * 20_000 + "</description></workflow>",
        "doctype after comment, PI and BOM": "\ufeff<?xml version='1.0'?><!-- hi --><?pi x?>\n"
                                             f'<!DOCTYPE workflow SYSTEM "{url}"><workflow name="w"/>',
        "XInclude": '<workflow name="w" xmlns:xi="http://www.w3.org/2001/XInclude"><channel name="c">'
                    f'<item><xi:include href="{url}" parse="text"/></item></channel></workflow>',
        "XInclude, relative": '<workflow name="w"><description><xi:include '
                              'xmlns:xi="http://www.w3.org/2001/XInclude" href="secret.txt" '
                              'parse="text"/></description></workflow>',
        "deep nesting": '<workflow name="w">' + "<a>" * 10_000 + "</a>" * 10_000 + "</workflow>",
        "deep nesting under the libxml2 limit": '<workflow name="w">' + "<a>" * 100 + "</a>" * 100
                                                + "</workflow>",
    }
    return {k: v.encode("utf-8") for k, v in docs.items()}


ATTACKS = list(attack_docs(Path("/x")))


@pytest.mark.parametrize("name", ATTACKS)
def test_xml_attacks_are_rejected_quickly_without_reading_anything(attack, name):
    folder, secret = attack
    path = write(folder, attack_docs(secret)[name])
    start = time.monotonic()
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0
    text = str(info.value)
    assert SENTINEL not in text
    expected = {"XInclude": "XInclude is not allowed", "deep": "nested too deeply"}
    want = next((v for k, v in expected.items() if name.startswith(k)),
                "DTDs and entities are not allowed")
    assert want in text
    assert all(p.line is not None for p in info.value.problems)


def _never_opens(fifo: Path, action) -> dict:
    """Run ``action`` in a thread; had it opened ``fifo`` it would block there.

    A FIFO with no writer blocks whoever opens it for reading: if the action
    is still running after 3 s, unblock it and fail the test.
    """
    outcome = {}

    def run():
        try:
            outcome["result"] = action()
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(3)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(3)
        pytest.fail(f"the parser opened {fifo}")
    return outcome


@pytest.mark.parametrize("name", [n for n in ATTACKS if "entity" in n or "DTD" in n or "XInclude" in n
                                  or "doctype" in n])
def test_referenced_files_are_never_even_opened(tmp_path, name):
    fifo = tmp_path / "secret.txt"
    os.mkfifo(fifo)
    data = attack_docs(fifo)[name]
    path = write(tmp_path, data)
    outcome = _never_opens(fifo, lambda: load_workflow(path))
    assert isinstance(outcome.get("error"), WorkflowError)
    # Defence in depth: even without the DOCTYPE check that runs before lxml,
    # the lxml parser itself (options + resolver) opens nothing.
    outcome = _never_opens(fifo, lambda: parser._parse_xml(data, str(path)))
    assert isinstance(outcome.get("error"), parser._Fatal)  # rejected after parsing (DOCTYPE or XInclude)


@pytest.mark.parametrize("name", ["billion laughs", "quadratic blowup", "internal entity", "external entity"])
def test_the_lxml_layer_alone_is_safe_too(attack, name):
    # Bypass the DOCTYPE check that runs before lxml: the parser's options
    # still expand nothing, read nothing, and reject the document quickly.
    folder, secret = attack
    start = time.monotonic()
    with pytest.raises(parser._Fatal) as info:
        parser._parse_xml(attack_docs(secret)[name], "wf.xml")
    assert time.monotonic() - start < 1.0
    [p] = info.value.problems
    assert "DTDs and entities are not allowed" in p.message and SENTINEL not in str(p)


def test_a_50_mib_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.xml"
    with open(path, "wb") as f:
        f.write(b'<workflow name="w"><description>')
        chunk = b"x" * MiB
        for _ in range(50):
            f.write(chunk)
        f.write(b"</description></workflow>")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    [p] = problems_of(path)
    assert time.monotonic() - start < 1.0
    assert "larger than 1 MiB" in p.message and p.fix
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 16 * 1024, "memory stays bounded: the file is not read"


def test_exactly_at_the_size_limit_is_fine_one_byte_more_is_not(tmp_path):
    head = b'<workflow name="w"><description>'
    tail = b"</description>" + proc().encode() + b"</workflow>"
    fill = MAX_XML_BYTES - len(head) - len(tail)
    path = write(tmp_path, head + b"x" * fill + tail)
    wf, _ = load_workflow(path)
    assert len(wf.description) == fill
    path = write(tmp_path, head + b"x" * (fill + 1) + tail)
    assert "larger than 1 MiB" in problems_of(path)[0].message


def test_memory_stays_bounded_across_every_attack(attack):
    folder, secret = attack
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, data in attack_docs(secret).items():
        with pytest.raises(WorkflowError):
            load_workflow(write(folder, data, name.replace(" ", "_") + ".xml"))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 32 * 1024


@pytest.mark.parametrize("data, text", [
    (b"", "the file is empty"),
    (b"  \n\t\n", "the file is empty"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "NUL bytes"),
    ('<workflow name="w"/>'.encode("utf-16"), "UTF-16"),
    (b'<workflow name="caf\xe9"/>', "not valid UTF-8"),
    (b"just some text", "XML syntax error"),
    (b'<workflow name="w">', "XML syntax error"),
    (b'<?xml version="1.0" encoding="latin-1"?><workflow name="w"/>', "flowd reads UTF-8 only"),
])
def test_empty_binary_and_non_utf8_files_are_clean_problems(tmp_path, data, text):
    [p] = problems_of(write(tmp_path, data))
    assert text in p.message and p.fix


def test_paths_that_are_not_workflow_files(tmp_path):
    assert "no such file" in problems_of(tmp_path / "missing.xml")[0].message
    assert "folder" in problems_of(tmp_path)[0].message
    fifo = tmp_path / "pipe.xml"
    os.mkfifo(fifo)
    start = time.monotonic()
    assert "not a regular file" in problems_of(fifo)[0].message  # and it does not hang
    assert time.monotonic() - start < 1.0


def test_doctype_text_inside_a_script_is_just_text(tmp_path):
    text = ('<workflow name="w"><process name="p" image="x"><script><![CDATA[\n'
            'cat > page.html <<EOF\n<!DOCTYPE html>\n<p>&nbsp;</p>\nEOF\n]]></script></process></workflow>')
    wf, _ = load_workflow(write(tmp_path, text))
    assert "<!DOCTYPE html>" in wf.processes["p"].script


def test_hostile_values_are_quoted_short_and_on_one_line(tmp_path):
    value = "x&#10;" * 5000  # 10,000 characters with real newlines in them
    process = proc(extra=f' timeout="{value}"')
    [p] = problems_of(write(tmp_path, f'<workflow name="w">{process}</workflow>'))
    assert p.message.startswith('attribute "timeout" is "x\\nx\\n')
    assert "\n" not in str(p) and len(str(p)) < 400


def test_the_schema_validates_in_linear_time():
    # libxml2 is quadratic on <interleave>; the schema avoids it (see its header)
    for body in ("".join(f'<channel name="c{i}"/>' for i in range(40_000)),
                 '<process name="p"><script>x</script>' + '<input channel="c"/>' * 40_000 + "</process>"):
        root = parser._parse_xml(f'<workflow name="w">{body}</workflow>'.encode(), "wf.xml")
        start = time.monotonic()
        assert parser._schema_problems(root, "wf.xml") == []
        assert time.monotonic() - start < 1.0  # linear: 0.07 s; with <interleave>: 2 s


@pytest.mark.parametrize("body", [
    "<proces/>" * 100_000,  # unknown elements (each with a "did you mean")
    '<process name="p" image="x">' + "".join(f'<input channel="d{i}"/>' for i in range(40_000))
    + "<script>x</script></process>",  # undeclared channels
    "".join(f'<process name="p{i}" image="x"><input channel="x" as="i"/><output channel="x" as="o"/>'
            f"<script>x</script></process>" for i in range(9_000)),  # readers and writers of one channel
], ids=["unknown elements", "undeclared channels", "one channel, 9000 readers and writers"])
def test_worst_case_files_are_checked_quickly(tmp_path, body):
    path = write(tmp_path, f'<workflow name="w"><channel name="x"/>{body}</workflow>')
    assert path.stat().st_size <= MAX_XML_BYTES
    start = time.monotonic()
    problems = problems_of(path)
    assert time.monotonic() - start < 5.0  # about 0.6 s; a quadratic check would take minutes
    assert len(problems) <= 2 * MAX_PROBLEMS + 2


# -- fuzzing -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    """A copy of the valid corpus folder (data/ and scripts/) to fuzz in."""
    d = tmp_path_factory.mktemp("fuzz")
    for src in VALID.rglob("*"):
        dst = d / src.relative_to(VALID)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    return d


SEEDS = [p.read_bytes() for p in sorted(VALID.glob("*.xml"))]
XML_BITS = [b"<", b">", b"/>", b"</", b"&", b";", b"&amp;", b'"', b"'", b"=", b"<!--", b"-->",
            b"<![CDATA[", b"]]>", b"<!DOCTYPE x>", b"<?pi?>", b" ", b"\n", b"\x00", b"\xff", b"\xe9",
            b"channel", b"process", b"input", b"output", b"mux", b"item", b"name", b"as", b"from",
            b"..", b"/", b"*", b"-1", b"0", b"#", b"xmlns:xi", b"&#0;", b"&#x10FFFF;"]


def _check_clean(path: Path) -> None:
    try:
        load_workflow(path)
    except WorkflowError as exc:
        assert exc.problems
        for p in exc.problems:
            assert "internal error" not in p.message, str(p)
            assert p.file == str(path)
            assert p.line is None or p.line >= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000))
def test_fuzz_random_bytes_only_ever_raise_workflow_error(fuzz_dir, data):
    _check_clean(write(fuzz_dir, data, "fuzz.xml"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.sampled_from(SEEDS),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 40),
                                st.sampled_from(XML_BITS) | st.binary(max_size=8)), min_size=1, max_size=6))
def test_fuzz_mutated_valid_files_only_ever_raise_workflow_error(fuzz_dir, seed, edits):
    data = bytearray(seed)
    for pos, cut, insert in edits:
        pos %= len(data) + 1
        data[pos:pos + cut] = insert
    _check_clean(write(fuzz_dir, bytes(data), "fuzz.xml"))


def test_value_from_and_split_are_read_and_kept_in_the_runs_json_form():
    wf, warnings = load_workflow(VALID / "values.xml")
    assert warnings == []
    lines, count = wf.processes["lines"], wf.processes["count"]
    assert (lines.inputs[0].value, lines.outputs[0].source, lines.outputs[0].split) == \
        (False, "stdout", "lines")
    assert (count.inputs[0].value, count.inputs[0].as_name) == (True, "line")
    assert (count.outputs[0].source, count.outputs[0].split) == ("file", None)
    again = Workflow.from_dict(json.loads(json.dumps(wf.to_dict())))
    assert again == wf
    # a run.json written before these attributes existed reads as before
    old = wf.to_dict()
    for p in old["processes"].values():
        for port in p["inputs"] + p["outputs"]:
            for key in ("value", "source", "split"):
                del port[key]
    back = Workflow.from_dict(old)
    ports = back.processes["count"].inputs + back.processes["lines"].outputs
    assert [(p.value, p.source, p.split) for p in ports] == [(False, "file", None)] * 2
