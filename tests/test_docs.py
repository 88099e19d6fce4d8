"""The examples of docs/format.md and docs/flowctl.md run as written.

Conventions of the docs (fence info strings):

- ```xml workflow``  a complete, valid workflow. It is saved as ``try.xml``
  in a copy of docs/examples/ (which holds the files the examples name) and
  validated there: no warnings unless the info string says ``warns``.
  ``run=succeeded|failed`` also runs it against the real Docker engine and
  expects that final state; ``run=service`` submits it, pushes
  ``push=CHANNEL:TEXT`` (as TEXT plus a newline), and cancels it;
  ``failed=N``: the run ends with N failed tasks, and for ``run=failed`` the
  few lines before the example name the failure's reason.
- ```xml invalid``  a workflow that validation rejects.
- ```text validate-output``  right after one of those two: exactly the
  problems ``flowctl validate try.xml`` prints on stderr.
- ```text results``  right after a ``run=`` workflow: lines ``CHANNEL: ITEM``
  giving, in order, the items of each channel named (each item without its
  trailing newline).
- ```json NAME``  in flowctl.md: the documented ``--json`` shapes; every key
  shown must be in what flowctl prints (keys may be added, never removed).
- ```sh`` blocks of flowctl.md: every ``flowctl ...`` command line parses
  with flowctl's own argument parser.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowd.errors import WorkflowError
from flowd.parser import load_workflow

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
FORMAT = DOCS / "format.md"
FLOWCTL = DOCS / "flowctl.md"
EXAMPLE_FILES = DOCS / "examples"

FENCE_RE = re.compile(r"^```(.*)$")


@dataclass
class Block:
    lang: str
    tags: set[str]
    opts: dict[str, str]
    text: str
    line: int  # of the opening fence, 1-based
    doc: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").split("\n")
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        words = m.group(1).split()
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: fence not closed"
        i += 1
        lang = words[0] if words else ""
        tags = {w for w in words[1:] if "=" not in w}
        opts = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        out.append(Block(lang, tags, opts, "\n".join(body) + "\n", start + 1, path.name))
    return out


FORMAT_BLOCKS = blocks(FORMAT)
XML_BLOCKS = [b for b in FORMAT_BLOCKS if b.lang == "xml"]
RUN_BLOCKS = [b for b in XML_BLOCKS if "run" in b.opts]


def _after(block: Block, kind: str, pool: list[Block] = FORMAT_BLOCKS) -> Block | None:
    """The block right after ``block`` if it is a ```text KIND block."""
    i = pool.index(block) + 1
    while i < len(pool) and pool[i].lang == "sh":  # commands showing how to run it
        i += 1
    if i < len(pool) and pool[i].lang == "text" and kind in pool[i].tags:
        return pool[i]
    return None


def _before(block: Block, pool: list[Block] = FORMAT_BLOCKS) -> Block:
    i = pool.index(block) - 1
    while pool[i].lang == "sh":
        i -= 1
    return pool[i]


def _example_dir(tmp: Path, block: Block) -> Path:
    folder = tmp / "examples"
    shutil.copytree(EXAMPLE_FILES, folder)
    (folder / "try.xml").write_text(block.text, encoding="utf-8")
    return folder


def test_the_docs_follow_the_conventions():
    assert XML_BLOCKS, "no xml examples found"
    for b in XML_BLOCKS:
        assert b.tags & {"workflow", "invalid"}, f"{b.where}: mark it ```xml workflow or invalid"
        assert b.tags <= {"workflow", "invalid", "warns"}, b.where
        assert set(b.opts) <= {"run", "push", "failed"}, b.where
        if "run" in b.opts:
            assert b.opts["run"] in ("succeeded", "failed", "service"), b.where
            assert "flowd/busybox" in b.text, f"{b.where}: run examples use the local flowd/busybox"
    for b in FORMAT_BLOCKS:
        if b.lang == "text" and "results" in b.tags:
            prev = _before(b)
            assert "run" in prev.opts, f"{b.where}: results follow a run= workflow"
        if b.lang == "text" and "validate-output" in b.tags:
            prev = _before(b)
            assert prev.lang == "xml", f"{b.where}: validate-output follows an xml block"
    # every element of the format has an example
    for element in ("workflow", "description", "defaults", "channel", "item", "items", "process",
                    "input", "output", "env", "script", "mux"):
        assert any(f"<{element} " in b.text or f"<{element}>" in b.text or f"<{element}/>" in b.text
                   for b in XML_BLOCKS if "workflow" in b.tags), element


@pytest.mark.parametrize("block", XML_BLOCKS, ids=[b.where for b in XML_BLOCKS])
def test_format_example_validates_as_shown(block, tmp_path, monkeypatch):
    folder = _example_dir(tmp_path, block)
    monkeypatch.chdir(folder)
    expected = _after(block, "validate-output")
    if "invalid" in block.tags:
        with pytest.raises(WorkflowError) as info:
            load_workflow("try.xml")
        problems = info.value.problems
    else:
        wf, problems = load_workflow("try.xml")
        assert wf.name
        if "warns" not in block.tags:
            assert problems == [], f"{block.where}: unexpected warnings {problems}"
        else:
            assert problems, f"{block.where}: marked warns, but there is no warning"
    if expected is not None:
        assert "\n".join(str(p) for p in problems) + "\n" == expected.text, block.where


def test_the_shipped_example_files_are_used():
    """Every file under docs/examples/ is named by some example (no stale files)."""
    text = "".join(b.text for b in XML_BLOCKS)
    for path in EXAMPLE_FILES.rglob("*"):
        if path.is_file():
            rel = path.relative_to(EXAMPLE_FILES).as_posix()
            folder = rel.rsplit("/", 1)[0]
            assert rel in text or f'glob="{folder}/' in text, f"docs/examples/{rel} is not used"


def _results(block: Block) -> dict[str, list[str]]:
    res = _after(block, "results")
    out: dict[str, list[str]] = {}
    if res is None:
        return out
    for line in res.text.splitlines():
        if not line:
            continue
        channel, _, item = line.partition(": ")
        out.setdefault(channel, []).append(item)
    return out


# -- flowctl.md: command lines and --json shapes ----------------------------------------

FLOWCTL_BLOCKS = blocks(FLOWCTL) if FLOWCTL.exists() else []
JSON_BLOCKS = {next(iter(b.tags)): b for b in FLOWCTL_BLOCKS if b.lang == "json" and b.tags}


def _command_lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        for m in re.finditer(r"(?:^|[(|;&]\s*|\$\()\s*(flowctl\b[^|#)\n]*)", line):
            out.append(m.group(1).strip())
    return out


def test_every_flowctl_command_line_in_the_docs_parses():
    from flowctl.cli import build_parser

    lines = []
    for path in (FLOWCTL, FORMAT, REPO / "README.md"):
        if not path.exists():
            continue
        for b in blocks(path):
            if b.lang in ("sh", "console"):
                lines += [(f"{b.where}", c) for c in _command_lines(b.text)]
    assert lines
    for where, line in lines:
        argv = shlex.split(line)[1:]
        argv = [a for a in argv if a not in ("...", "\\")]
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:  # argparse exits 2 on bad usage, 0 on --help
            assert e.code == 0, f"{where}: `{line}` does not parse"


def test_every_command_has_a_section_in_flowctl_md():
    from flowctl.cli import build_parser

    text = FLOWCTL.read_text(encoding="utf-8")
    ap = build_parser()
    sub = next(a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, parser in sub.choices.items():
        assert re.search(rf"^### `?{name}\b", text, re.M), f"flowctl {name} has no section"
        for action in parser._actions:
            for opt in action.option_strings:
                if opt in ("-h", "--help"):
                    continue
                assert opt in text, f"flowctl {name} {opt} is not documented"


def assert_shape(doc, actual, where="$"):
    """Every key the docs show is in ``actual``, with a value of the same kind."""
    if isinstance(doc, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for k, v in doc.items():
            assert k in actual, f"{where}: documented key {k!r} missing from {sorted(actual)}"
            assert_shape(v, actual[k], f"{where}.{k}")
    elif isinstance(doc, list):
        assert isinstance(actual, list), f"{where}: expected a list, got {actual!r}"
        if doc:
            for i, a in enumerate(actual):
                assert_shape(doc[0], a, f"{where}[{i}]")
    elif doc is None or actual is None:
        return
    elif isinstance(doc, bool):
        assert isinstance(actual, bool), f"{where}: expected true/false, got {actual!r}"
    elif isinstance(doc, (int, float)):
        assert isinstance(actual, (int, float)) and not isinstance(actual, bool), \
            f"{where}: expected a number, got {actual!r}"
    else:
        assert isinstance(actual, type(doc)), f"{where}: expected {type(doc).__name__}, got {actual!r}"


def _doc_json(name: str):
    assert name in JSON_BLOCKS, f"flowctl.md has no ```json {name} block"
    return json.loads(JSON_BLOCKS[name].text)


def test_validate_json_is_as_documented(capsys):
    from flowctl.cli import main

    assert main(["validate", "--json", str(REPO / "examples" / "wordcount" / "workflow.xml")]) == 0
    assert_shape(_doc_json("validate"), json.loads(capsys.readouterr().out))
    bad = REPO / "tests" / "data" / "invalid" / "undeclared_channel.xml"
    assert main(["validate", "--json", str(bad)]) == 2
    assert_shape(_doc_json("validate-invalid"), json.loads(capsys.readouterr().out))


def test_run_summary_and_detail_are_as_documented(tmp_path):
    """status --json (one run and the list) against a run driven by the fake executor."""
    from helpers import proc, wf

    from flowd.executor.fake import FakeExecutor
    from flowd.fsops import Durable
    from flowd.run import Run
    from flowd.taskspec import Limits

    def double(t):
        n = t.read("numbers").decode()
        if not n.isdigit():
            return 3
        t.write("doubled", str(int(n) * 2).encode())
        return 0

    w = wf(channels={"numbers": ["4", "oops", "9"], "doubled": []},
           processes=[proc("double", "numbers", "doubled", on_failure="continue")])
    runs = tmp_path / "runs"
    bundle = tmp_path / "bundle"
    runs.mkdir()
    bundle.mkdir()
    fs = Durable()
    path = Run.create(str(runs), "abcdef012345", w, str(bundle), fs,
                      {"submitted_at": time.time(), "source": "wf.xml", "submitted_by": "me"})
    events = []
    ex = FakeExecutor(events.append, {"double": double})
    run = Run.open(path, fs, ex, Limits())
    run.resume()
    for _ in range(50):
        run.tick(8)
        ex.run_pending()
        while events:
            run.on_result(events.pop(0))
        if run.finished:
            break
    assert run.state == "succeeded"
    detail = json.loads(json.dumps(run.view.detail()))
    assert detail["failures"], "the example needs a failed task"
    assert_shape(_doc_json("status-run"), detail)
    summary = json.loads(json.dumps(run.view.summary()))
    assert_shape(_doc_json("status-list")["runs"][0], summary)


# -- the real engine: run the examples ----------------------------------------------------

@pytest.fixture(scope="module")
def doc_daemon(docker_images):
    import tempfile

    from daemon_fixtures import Daemon, _remove_containers, test_root

    work = tempfile.mkdtemp(prefix="test_docs-", dir=test_root())
    sockdir = tempfile.mkdtemp(prefix="flowd-sock-")
    d = Daemon(os.path.join(work, "spool"), os.path.join(sockdir, "flowd.sock")).start()
    yield d
    d.stop()
    _remove_containers(os.path.realpath(d.spool))
    shutil.rmtree(sockdir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


def _flowctl_json(daemon, *args, check=0, **kw):
    res = daemon.flowctl(*args, "--json", check=check, **kw)
    return json.loads(res.stdout)


def _pull(daemon, run: str, channel: str, out: Path) -> list[bytes]:
    got = _flowctl_json(daemon, "pull", run, channel, "--out", str(out))
    return [Path(f["file"]).read_bytes() for f in got["files"]]


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.where for b in RUN_BLOCKS])
def test_format_example_runs_as_shown(block, doc_daemon, tmp_path):
    folder = _example_dir(tmp_path, block)
    xml = str(folder / "try.xml")
    want = block.opts["run"]
    expected = _results(block)
    if want == "service":
        sub = _flowctl_json(doc_daemon, "submit", xml)
        run = sub["run"]
        assert _flowctl_json(doc_daemon, "status", run)["state"] == "running"
        channel, _, text = block.opts["push"].partition(":")
        seq = doc_daemon.flowctl("push", run, channel, input=text + "\n", check=0).stdout
        assert seq.strip().isdigit()
        total = sum(len(v) for v in expected.values())
        deadline = time.monotonic() + 60
        while True:
            detail = _flowctl_json(doc_daemon, "status", run)
            depths = {c["name"]: c["depth"] for c in detail["channels"]}
            if sum(depths[c] for c in expected) >= total and not detail["tasks_running"]:
                break
            assert time.monotonic() < deadline, f"{block.where}: no results: {detail}"
            time.sleep(0.2)
        assert detail["state"] == "running"
    else:
        res = doc_daemon.flowctl("submit", "--wait", "--json", xml,
                                 check=0 if want == "succeeded" else 1)
        detail = json.loads(res.stdout)
        run = detail["id"]
        assert detail["state"] == want, f"{block.where}: {detail}"
        if "failed" in block.opts:
            assert detail["tasks_failed"] == int(block.opts["failed"]), detail
        if want == "failed":  # the text before the example gives the reason
            assert detail["failures"], detail
            before = "\n".join(FORMAT.read_text(encoding="utf-8").split("\n")[block.line - 6:block.line])
            assert detail["failures"][-1]["reason"] in before.replace("\n", " "), block.where
    for channel, items in expected.items():
        got = _pull(doc_daemon, run, channel, tmp_path / "out" / channel)
        assert [g.decode().removesuffix("\n") for g in got] == items, f"{block.where}: {channel}"
    if want == "service":
        cancelled = _flowctl_json(doc_daemon, "cancel", run)
        assert cancelled["runs"][0]["state"] == "cancelled"


@pytest.mark.docker
def test_flowctl_json_shapes_are_as_documented(doc_daemon, tmp_path):
    """Every --json shape of flowctl.md, from a real daemon."""
    d = doc_daemon
    folder = tmp_path / "wf"
    folder.mkdir()
    (folder / "keep-going.xml").write_text("""<workflow name="keep-going">
  <channel name="numbers"><item>4</item><item>oops</item><item>9</item></channel>
  <channel name="doubled"/>
  <process name="double" image="flowd/busybox" on-failure="continue">
    <input channel="numbers" as="n"/>
    <output channel="doubled"/>
    <script>
      case "$(cat n)" in *[!0-9]*) echo "not a number: $(cat n)" &gt;&amp;2; exit 3;; esac
      echo $(( $(cat n) * 2 )) &gt; doubled
    </script>
  </process>
</workflow>
""")
    (folder / "service.xml").write_text("""<workflow name="upper" mode="service">
  <channel name="requests"/>
  <channel name="replies"/>
  <process name="upper" image="flowd/busybox">
    <input channel="requests" as="in.txt"/>
    <output channel="replies" as="out.txt"/>
    <script>tr a-z A-Z &lt; in.txt &gt; out.txt</script>
  </process>
</workflow>
""")
    sub = _flowctl_json(d, "submit", str(folder / "keep-going.xml"))
    assert_shape(_doc_json("submit"), sub)
    detail = _flowctl_json(d, "watch", sub["run"])
    assert_shape(_doc_json("status-run"), detail)
    waited = json.loads(d.flowctl("submit", "--wait", "--json", str(folder / "keep-going.xml"),
                                  check=0).stdout)
    assert_shape(_doc_json("status-run"), waited)
    assert_shape(_doc_json("status-list"), _flowctl_json(d, "status"))
    assert_shape(_doc_json("status-run"), _flowctl_json(d, "status", sub["run"][:4]))
    assert_shape(_doc_json("pull"), _flowctl_json(d, "pull", sub["run"], "doubled",
                                                  "--out", str(tmp_path / "pulled")))
    assert_shape(_doc_json("logs"), _flowctl_json(d, "logs", sub["run"]))
    svc = _flowctl_json(d, "submit", str(folder / "service.xml"))["run"]
    pushed = _flowctl_json(d, "push", svc, "requests", input="hi\n")
    assert_shape(_doc_json("push"), pushed)
    ok_shape = _doc_json("cancel")
    del ok_shape["runs"][0]["message"]  # documented: only when ok is false
    assert_shape(ok_shape, _flowctl_json(d, "cancel", svc))
    again = d.flowctl("cancel", svc, "--json", check=1)
    assert_shape(_doc_json("cancel"), json.loads(again.stdout))
    missing = d.flowctl("status", "ffffffffffff", "--json", check=1)
    assert_shape(_doc_json("error"), json.loads(missing.stdout))


@pytest.mark.docker
def test_cache_json_shapes_are_as_documented(doc_daemon, tmp_path):
    """why, cache ls and cache rm --json, from a real daemon: a run, the same run
    again (cached), and one with its script changed (a miss with a difference)."""
    d = doc_daemon
    xml = tmp_path / "c.xml"

    def submit(script: str) -> str:
        xml.write_text(f"""<workflow name="docs-cache">
  <channel name="words"><item>tea</item></channel>
  <channel name="loud"/>
  <process name="upper" image="flowd/busybox" cache="yes">
    <input channel="words" as="word"/>
    <output channel="loud"/>
    <script>{script}</script>
  </process>
</workflow>
""")
        return json.loads(d.flowctl("submit", "--wait", "--json", str(xml), check=0).stdout)["id"]

    first = submit("tr a-z A-Z &lt; word &gt; loud")
    again = submit("tr a-z A-Z &lt; word &gt; loud")
    cached = _flowctl_json(d, "why", again, "1")
    assert cached["cached"] is True and cached["from"] == {"run": first, "task": "1"}
    cached_shape = _doc_json("why")
    del cached_shape["compared_with"]  # documented: null for a cached task
    assert_shape(cached_shape, cached)
    changed = submit("tr a-z A-Z &lt; word &gt; loud; true")
    missed = _flowctl_json(d, "why", changed, "1")
    assert missed["cached"] is False and any("script" in x for x in missed["differences"])
    assert_shape(_doc_json("why"), missed)
    listing = _flowctl_json(d, "cache", "ls")
    assert any(r["process"] == "docs-cache/upper" for r in listing["processes"])
    assert_shape(_doc_json("cache-ls"), listing)
    removed = _flowctl_json(d, "cache", "rm", "--process", "docs-cache/upper")
    assert removed["removed"] >= 2
    assert_shape(_doc_json("cache-rm"), removed)
