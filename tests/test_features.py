"""Failures, retries, limits, languages, service mode and logs, against the real engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from daemon_fixtures import env_for_subprocess
from test_daemon import pull, run_containers, submit_wait, wait_until, write

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    pass


def one_process(workdir, name, script, items=("x",), **attrs):
    extra = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    image = attrs.pop("image", None)
    items_xml = "".join(f"<item>{i}</item>" for i in items)
    if image is None:
        extra = f'image="flowd/busybox" {extra}'
    xml = f"""<workflow name="{name}">
  <channel name="in">{items_xml}</channel><channel name="out"/>
  <process name="p" {extra}>
    <input channel="in"/><output channel="out"/>
    <script><![CDATA[{script}]]></script>
  </process>
</workflow>"""
    return write(os.path.join(workdir, name, "workflow.xml"), xml)


def test_a_flaky_script_succeeds_on_attempt_3_with_the_same_input(daemon, workdir):
    xml = one_process(workdir, "flaky", 'echo "attempt $FLOWD_ATTEMPT saw $(cat in)"\n'
                      '[ "$FLOWD_ATTEMPT" -ge 3 ] || exit 1\ncp in out', retries=2)
    detail = submit_wait(daemon, xml)
    assert detail["state"] == "succeeded" and detail["failures"] == []
    assert pull(daemon, detail["id"], "out", os.path.join(workdir, "o")) == [b"x"]
    logs = daemon.flowctl("logs", detail["id"], check=0).stdout
    assert [line for line in logs.splitlines() if line.startswith("attempt")] == \
        ["attempt 1 saw x", "attempt 2 saw x", "attempt 3 saw x"]


@pytest.mark.parametrize("kind,script,attrs,reason", [
    ("crash", "exit 7", {}, "exit status 7"),
    ("timeout", "sleep 60", {"timeout": "1s"}, "timed out after 1s"),
    # The hog is a child: the script's shell lives to say what the kernel did,
    # since the engine's OOMKilled flag is lost now and then on cgroup v1.
    ("oom", "sh -c 'x=aaaaaaaaaaaaaaaaaaaa; while :; do x=$x$x; done'", {"memory": "8m"},
     "out of memory"),
])
def test_failures_are_retried_then_kept_with_their_reason(daemon, workdir, docker_client,
                                                          kind, script, attrs, reason):
    xml = one_process(workdir, kind, script, retries=1, **attrs)
    detail = submit_wait(daemon, xml, check=1)
    assert detail["state"] == "failed"
    (failure,) = detail["failures"]
    assert reason in failure["reason"] and failure["attempts"] == 2
    assert len(failure["history"]) == 2
    # the input survives, as a failed task the operator can inspect
    failed_dir = os.path.join(daemon.spool, "runs", detail["id"], "failed", failure["folder"], "in")
    (kept,) = os.listdir(failed_dir)
    assert open(os.path.join(failed_dir, kept), "rb").read() == b"x"
    # no container left behind (removal runs beside the loop: give it a moment)
    wait_until(lambda: run_containers(docker_client, detail["id"]) == [], timeout=30,
               what="the task's containers to be removed")
    assert reason in daemon.flowctl("status", detail["id"]).stdout


def test_continue_goes_on_and_the_run_succeeds_with_failures_counted(daemon, workdir):
    xml = one_process(workdir, "cont", '[ "$(cat in)" = bad ] && exit 1; cp in out',
                      items=("a", "bad", "c"), on_failure="continue")
    detail = submit_wait(daemon, xml)
    assert detail["state"] == "succeeded" and detail["tasks_failed"] == 1
    assert pull(daemon, detail["id"], "out", os.path.join(workdir, "o")) == [b"a", b"c"]


def test_a_python_script_runs_in_a_python_image(daemon, workdir, python_image):
    xml = one_process(workdir, "py", "import os, sys\n"
                      "n = int(open('in').read())\n"
                      "open('out', 'w').write(f'{n * n} from python {sys.version_info[0]} "
                      "attempt {os.environ[\"FLOWD_ATTEMPT\"]}')\n",
                      items=("7",), image=python_image, lang="python")
    detail = submit_wait(daemon, xml)
    assert pull(daemon, detail["id"], "out", os.path.join(workdir, "o")) == \
        [b"49 from python 3 attempt 1"]


def test_a_missing_interpreter_is_said_plainly(daemon, workdir):
    xml = one_process(workdir, "nonode", "console.log(1)", lang="node")
    detail = submit_wait(daemon, xml, check=1)
    assert "the image has no node" in detail["failures"][0]["log_tail"]


def test_three_pushes_to_a_service_run_give_three_outputs_in_order(daemon, workdir):
    xml = write(os.path.join(workdir, "svc", "workflow.xml"), """<workflow name="svc" mode="service">
  <channel name="requests"/><channel name="replies"/>
  <process name="handle" image="flowd/busybox">
    <input channel="requests"/><output channel="replies"/>
    <script>echo "reply to $(cat requests)" > replies</script>
  </process>
</workflow>""")
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    for word in ("one", "two", "three"):
        seq = daemon.flowctl("push", run, "requests", input=word, check=0).stdout.strip()
        assert seq.isdigit()
    path = os.path.join(workdir, "payload")
    with open(path, "wb") as f:
        f.write(b"four")
    daemon.flowctl("push", run, "requests", path, check=0)

    def replies():
        d = json.loads(daemon.flowctl("status", run, "--json").stdout)
        return {c["name"]: c["depth"] for c in d["channels"]}["replies"] == 4

    wait_until(replies, what="four replies")
    assert json.loads(daemon.flowctl("status", run, "--json").stdout)["state"] == "running"
    assert pull(daemon, run, "replies", os.path.join(workdir, "o")) == [
        b"reply to one\n", b"reply to two\n", b"reply to three\n", b"reply to four\n"]
    daemon.flowctl("cancel", run, check=0)
    assert json.loads(daemon.flowctl("status", run, "--json").stdout)["state"] == "cancelled"
    res = daemon.flowctl("push", run, "requests", input="late")
    assert res.returncode == 1 and "cancelled" in res.stderr


def test_logs_show_what_the_script_printed(daemon, workdir):
    xml = one_process(workdir, "logs", 'echo "MARKER-out $(cat in)"; echo MARKER-err >&2; cp in out',
                      items=("a", "b"))
    detail = submit_wait(daemon, xml)
    text = daemon.flowctl("logs", detail["id"], "p", check=0).stdout
    assert "MARKER-out a" in text and "MARKER-out b" in text and "MARKER-err" in text
    entries = json.loads(daemon.flowctl("logs", detail["id"], "--json", check=0).stdout)["logs"]
    assert len(entries) == 2 and {e["process"] for e in entries} == {"p"}
    one = daemon.flowctl("logs", detail["id"], "--task", entries[0]["task"], check=0).stdout
    assert one.count("MARKER-out") == 1
    res = daemon.flowctl("logs", detail["id"], "nosuch")
    assert res.returncode == 1 and "no process" in res.stderr


def test_the_daemon_wide_container_cap_holds_across_parallel(daemon_factory, workdir):
    cfg = write(os.path.join(workdir, "flowd.toml"), "max_containers = 1\n")
    d = daemon_factory(extra_args=["--config", cfg])
    d.start()
    xml = one_process(workdir, "cap", "read a b < /proc/uptime; echo \"start $a\"; sleep 1; "
                      "read a b < /proc/uptime; echo \"end $a\"; cp in out",
                      items=("1", "2", "3"), parallel=3)
    detail = submit_wait(d, xml)
    assert detail["state"] == "succeeded"
    text = d.flowctl("logs", detail["id"], check=0).stdout
    spans = []
    for line in text.splitlines():
        if line.startswith("start "):
            start = float(line.split()[1])
        elif line.startswith("end "):
            spans.append((start, float(line.split()[1])))
    spans.sort()
    assert len(spans) == 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


def test_the_service_example_answers_pushed_items(daemon, workdir):
    xml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "service", "workflow.xml")
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    for word in ("hello", "world"):
        daemon.flowctl("push", run, "requests", input=word, check=0)
    wait_until(lambda: {c["name"]: c["depth"] for c in json.loads(
        daemon.flowctl("status", run, "--json").stdout)["channels"]}["replies"] == 2,
        what="two replies")
    assert sorted(pull(daemon, run, "replies", os.path.join(workdir, "o"))) == [b"HELLO", b"WORLD"]
    daemon.flowctl("cancel", run, check=0)


def test_logs_follow_prints_lines_while_the_script_runs(daemon, workdir):
    xml = one_process(workdir, "live", "echo LIVE-1; sleep 4; echo LIVE-2 >&2; cp in out")
    run = daemon.flowctl("submit", xml, check=0).stdout.strip()
    follow = subprocess.Popen([sys.executable, "-m", "flowctl", "--socket", daemon.socket,
                               "logs", run, "--follow"], env=env_for_subprocess(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[str, dict | None]] = []  # each line, with the run's state when it came

    def read():
        for line in follow.stdout:
            state = None
            if "LIVE-1" in line:
                state = json.loads(daemon.flowctl("status", run, "--json").stdout)
            lines.append((line.rstrip("\n"), state))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("LIVE-1" in line for line, _ in lines), timeout=30,
                   what="the first line of the running script")
        (state,) = [s for line, s in lines if "LIVE-1" in line]
        # It came while the script was still running (4 s before its end).
        assert state["state"] == "running" and state["processes"][0]["running"] == 1, state
        listed = json.loads(daemon.flowctl("logs", run, "--json", check=0).stdout)["logs"]
        assert [e["running"] for e in listed] == [True]
        assert follow.wait(timeout=60) == 0, follow.stderr.read()
    finally:
        if follow.poll() is None:
            follow.kill()
    reader.join(timeout=10)
    text = [line for line, _ in lines]
    # Every line once, under one header, though the log moved from live to final.
    assert text == ["==> p task 1 attempt 1 <==", "LIVE-1", "LIVE-2"], text
    listed = json.loads(daemon.flowctl("logs", run, "--json", check=0).stdout)["logs"]
    assert [e["running"] for e in listed] == [False]
    assert not [n for n in os.listdir(os.path.join(daemon.spool, "runs", run, "logs"))
                if n.endswith(".live")]
