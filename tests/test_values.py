"""Values through channels (SPEC 6.5): input@value, output@from="stdout" and
output@split="lines", against the real engine with the daemon run as the unit
runs it (non-root flowd-test, see daemon_fixtures), in fresh and warm
containers. Waits are for conditions, never for durations.
"""
from __future__ import annotations

import glob
import json
import os
import re
import uuid
from xml.sax.saxutils import escape

import pytest

from daemon_fixtures import REPO
from test_swarm import docker_swarm  # noqa: F401  (the fixture: a Swarm manager)
from test_warm import no_shell_image  # noqa: F401  (the fixture: an image without /bin/sh)

pytestmark = pytest.mark.docker
EXAMPLES = os.path.join(REPO, "examples")
WAIT = 120
MODES = ("fresh", "warm")
# Item bytes a shell would act on if a value were ever interpolated
HOSTILE = [
    "$(touch /task/pwned)",
    "`id`; echo \"$HOME\" '$PATH'",
    "it's \"quoted\" \\ back\\slash",
    "two\nlines\n",
    "; rm -rf / #",
    "${IFS}*?[a]~ é ∑ \t tab",
    "",
]


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    """Every test here needs the engine (fails under CI without it) and flowd/busybox."""


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def folder(workdir) -> str:
    return os.path.join(workdir, "wf-" + uuid.uuid4().hex[:6])


def workflow(where: str, body: str, name: str = "w") -> str:
    return write(os.path.join(where, "workflow.xml"), f'<workflow name="{name}">{body}\n</workflow>\n')


def items(*values: str) -> str:
    return "".join(f"<item>{escape(v)}</item>" for v in values)


def submit_wait(d, path, check=None) -> dict:
    return json.loads(d.flowctl("submit", "--wait", "--json", path, check=check).stdout)


def pull(d, run, channel, out) -> list[bytes]:
    d.flowctl("pull", run, channel, "--out", out, check=0)
    return [open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))]


def reasons(det) -> dict[str, list[str]]:
    got: dict[str, list[str]] = {}
    for f in det["failures"]:
        got.setdefault(f["process"], []).append(f["reason"])
    return got


def vm_hwm(pid: int) -> int:
    """The daemon's peak resident memory so far, in bytes (/proc/PID/status VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


# -- values ---------------------------------------------------------------------------------------

def test_values_reach_sh_and_python_verbatim_in_fresh_and_warm_containers(daemon, workdir,
                                                                          python_image):
    """Hostile bytes (shell metacharacters, $(...), quotes, newlines, UTF-8) arrive
    byte for byte, through Docker's Env (fresh) and the warm agent's env file."""
    body = ""
    for mode in MODES:
        body += f"""
  <channel name="sh_{mode}">{items(*HOSTILE)}</channel><channel name="sh_{mode}_out"/>
  <process name="sh-{mode}" image="flowd/busybox" container="{mode}">
    <input channel="sh_{mode}" as="word" value="yes"/>
    <output channel="sh_{mode}_out" from="stdout"/>
    <script>printf '%s' "$word"; if [ -e /task/pwned ]; then echo PWNED; fi</script>
  </process>
  <channel name="py_{mode}">{items(*HOSTILE)}</channel><channel name="py_{mode}_out"/>
  <process name="py-{mode}" image="{python_image}" lang="python" container="{mode}">
    <input channel="py_{mode}" as="word" value="yes"/>
    <output channel="py_{mode}_out" from="stdout"/>
    <script>
      import os, sys
      sys.stdout.buffer.write(os.environb[b"word"])
    </script>
  </process>"""
    det = submit_wait(daemon, workflow(folder(workdir), body), check=0)
    assert det["state"] == "succeeded", det
    for lang in ("sh", "py"):
        for mode in MODES:
            got = pull(daemon, det["id"], f"{lang}_{mode}_out", os.path.join(workdir, lang + mode))
            assert got == [h.encode() for h in HOSTILE], (lang, mode, got)


def test_a_warm_task_sees_only_its_own_values(daemon_factory, workdir):
    d = daemon_factory().start()
    body = f"""
  <channel name="in">{items("first-secret", "second-secret", "third-secret")}</channel>
  <channel name="out"/>
  <process name="p" image="flowd/busybox" container="warm">
    <input channel="in" as="v" value="yes"/>
    <output channel="out" from="stdout"/>
    <script>echo "host=$(hostname) v=$v"; env; cat /.flowd/ctl/env; ls -a /tmp /task</script>
  </process>"""
    det = submit_wait(d, workflow(folder(workdir), body), check=0)
    assert det["state"] == "succeeded", det
    outs = [o.decode() for o in pull(d, det["id"], "out", os.path.join(workdir, "o"))]
    hosts = {re.search(r"host=(\S+)", o).group(1) for o in outs}
    assert len(hosts) == 1, "all three tasks ran in one warm container"
    for i, name in enumerate(("first", "second", "third")):
        assert f"v={name}-secret" in outs[i]
        others = [n for n in ("first", "second", "third") if n != name]
        assert not any(f"{n}-secret" in outs[i] for n in others), outs[i]


def test_a_value_too_big_with_a_nul_or_not_utf8_fails_the_task_and_keeps_its_input(
        daemon_factory, workdir):
    d = daemon_factory().start()
    where = folder(workdir)
    big = b"x" * (128 * 1024 + 1)
    near = b"y" * (100 * 1024)
    edge = b"z" * (128 * 1024 - len("v=") - 1)  # "v=" + item + its NUL: the kernel's 131072
    write(os.path.join(where, "big"), big)
    write(os.path.join(where, "nul"), b"a\x00b")
    write(os.path.join(where, "latin1"), b"caf\xe9")
    write(os.path.join(where, "near"), near)
    write(os.path.join(where, "edge"), edge)
    write(os.path.join(where, "edge1"), edge + b"z")
    body = ""
    for mode in MODES:
        body += f"""
  <channel name="in_{mode}"><item file="big"/><item file="nul"/><item file="latin1"/><item file="near"/><item file="edge"/><item file="edge1"/></channel>
  <channel name="out_{mode}"/>
  <process name="{mode}" image="flowd/busybox" container="{mode}" retries="1" on-failure="continue">
    <input channel="in_{mode}" as="v" value="yes"/>
    <output channel="out_{mode}" from="stdout"/>
    <script>printf '%s' "$v" | wc -c</script>
  </process>"""
    det = submit_wait(d, workflow(where, body), check=0)
    assert det["state"] == "succeeded", det
    assert det["tasks_failed"] == 8, det["failures"]
    why = reasons(det)
    for mode in MODES:
        got = sorted(why[mode])
        assert len(got) == 4, got
        assert any("is 131070 bytes; with its name" in r and "limit of 131072 bytes" in r
                   for r in got), got
        assert any("over 128 KiB" in r for r in got), got
        assert any("NUL byte (at offset 1)" in r for r in got), got
        assert any("not UTF-8 text (byte 0xe9 at offset 3)" in r for r in got), got
        assert all(r.startswith("value input v: item ") for r in got), got
        # the 100 KiB value went through, and the longest the kernel takes
        assert pull(d, det["id"], f"out_{mode}", os.path.join(workdir, mode)) == \
            [f"{len(near)}\n".encode(), f"{len(edge)}\n".encode()]
    for f in det["failures"]:
        assert f["attempts"] == 2, f  # retried like any failure
    kept = sorted(open(p, "rb").read() for p in glob.glob(
        os.path.join(d.spool, "**", "failed", "*", "in", "*"), recursive=True))
    assert kept == sorted([big, b"a\x00b", b"caf\xe9", edge + b"z"] * 2), \
        "the failed tasks' inputs are kept"


def test_a_bad_value_name_is_refused_at_submission_with_its_line(daemon, workdir):
    where = folder(workdir)
    path = workflow(where, f"""
  <channel name="my-words">{items("a")}</channel><channel name="out"/>
  <channel name="more">{items("b")}</channel>
  <process name="p" image="flowd/busybox">
    <input channel="my-words" value="yes"/>
    <input channel="more" as="PATH" value="yes"/>
    <output channel="out" from="stdout"/>
    <script>echo "$PATH"</script>
  </process>""")
    res = daemon.flowctl("submit", path, check=2)
    err = res.stderr
    assert f"{path}:5: error: <input>: a value input's as=\"my-words\"" in err, err
    assert "(fix: write as=\"my_words\")" in err, err
    assert f"{path}:6: error: <input>: a value input's as=\"PATH\" would set the environment " \
           "variable PATH" in err, err
    assert "Traceback" not in err


# -- stdout -------------------------------------------------------------------------------------

def _stdout_body(size: int) -> str:
    body = ""
    for mode in MODES:
        body += f"""
  <channel name="out_{mode}"/>
  <process name="{mode}" image="flowd/busybox" container="{mode}">
    <output channel="out_{mode}" from="stdout"/>
    <script>echo "to stderr" &gt;&amp;2; yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN | head -c {size}</script>
  </process>"""
    return body


def test_a_big_stdout_is_the_item_streamed_with_the_daemon_memory_flat(daemon, workdir):
    """The same workflow first with a 1 kB stdout (the baseline: what a run costs the
    daemon), then with 50 MB: the daemon's peak memory must not grow with the size."""
    det = submit_wait(daemon, workflow(folder(workdir), _stdout_body(1000)), check=0)
    assert det["state"] == "succeeded", det
    before = vm_hwm(daemon.proc.pid)
    size = 50 * 1000 * 1000
    det = submit_wait(daemon, workflow(folder(workdir), _stdout_body(size)), check=0)
    assert det["state"] == "succeeded", det
    grown = vm_hwm(daemon.proc.pid) - before
    print(f"50 MB stdout, fresh and warm, after a 1 kB baseline run: the daemon's VmHWM "
          f"{before} -> {before + grown} bytes")
    assert grown < 8 * 1024 * 1024, f"the daemon's peak memory grew by {grown} bytes"
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN\n"
    for mode in MODES:
        out = os.path.join(workdir, mode)
        daemon.flowctl("pull", det["id"], f"out_{mode}", "--out", out, check=0)
        (name,) = os.listdir(out)
        path = os.path.join(out, name)
        assert os.path.getsize(path) == size
        with open(path, "rb") as f:
            assert f.read(len(line) * 3) == line * 3
        logs = daemon.flowctl("logs", det["id"], mode, check=0).stdout
        assert "to stderr" in logs and "0123456789" not in logs, "the log keeps stderr only"


def test_stdout_over_the_output_cap_fails_the_task(daemon_factory, workdir):
    conf = write(os.path.join(workdir, "flowd.toml"), "max_output_size = \"1m\"\n")
    d = daemon_factory(extra_args=["--config", conf]).start()
    body = """
  <channel name="out"/>
  <process name="p" image="flowd/busybox">
    <output channel="out" from="stdout" split="lines"/>
    <script>yes | head -c 2000000</script>
  </process>"""
    det = submit_wait(d, workflow(folder(workdir), body), check=1)
    assert det["state"] == "failed", det
    assert "limit" in det["failures"][0]["reason"], det["failures"]


def test_stdout_and_values_in_an_image_without_a_shell_fail_clearly(daemon, workdir, no_shell_image):
    body = "".join(f"""
  <channel name="in_{m}">{items("x")}</channel><channel name="out_{m}"/>
  <process name="{m}" image="{no_shell_image}" container="{m}" on-failure="continue">
    <input channel="in_{m}" as="v" value="yes"/><output channel="out_{m}" from="stdout"/>
    <script>echo "$v"</script>
  </process>""" for m in MODES)
    det = submit_wait(daemon, workflow(folder(workdir), body), check=0)
    why = reasons(det)
    for m in MODES:
        assert "/bin/sh" in why[m][0], det["failures"]


# -- split ---------------------------------------------------------------------------------------

def test_split_lines_of_a_file_and_of_stdout_in_order(daemon, workdir):
    text = "a\nb\n\nc"  # an empty line in the middle is an item; a last line without LF is one
    body = ""
    for mode in MODES:
        body += f"""
  <channel name="in_{mode}">{items(text)}</channel>
  <channel name="file_{mode}"/><channel name="stdout_{mode}"/><channel name="none_{mode}"/>
  <process name="{mode}" image="flowd/busybox" container="{mode}">
    <input channel="in_{mode}" as="text"/>
    <output channel="file_{mode}" as="lines.txt" split="lines"/>
    <output channel="stdout_{mode}" from="stdout" split="lines"/>
    <output channel="none_{mode}" as="empty" split="lines"/>
    <script>
      cp text lines.txt
      printf 'one\\r\\ntwo\\n\\nthree\\rfour\\n'
      : &gt; empty
    </script>
  </process>"""
    det = submit_wait(daemon, workflow(folder(workdir), body), check=0)
    assert det["state"] == "succeeded", det
    for mode in MODES:
        assert pull(daemon, det["id"], f"file_{mode}", os.path.join(workdir, "f" + mode)) == \
            [b"a", b"b", b"", b"c"]
        # CR LF ends a line like LF; a lone CR is data; the empty last line after the LF is no item
        assert pull(daemon, det["id"], f"stdout_{mode}", os.path.join(workdir, "s" + mode)) == \
            [b"one", b"two", b"", b"three\rfour"]
        chans = {c["name"]: c["depth"] for c in det["channels"]}
        assert chans[f"none_{mode}"] == 0, "an empty output gives no line"


def _lines_body(n: int, width: int) -> str:
    return f"""
  <channel name="out"/>
  <process name="p" image="flowd/busybox">
    <output channel="out" from="stdout" split="lines"/>
    <script>seq 1 {n} | while read i; do printf "%0{width}d\\n" "$i"; done</script>
  </process>"""


def test_split_streams_its_lines_with_the_daemon_memory_flat(daemon, workdir):
    """3,000 lines of 16 kB (48 MB) after a 3,000-line baseline of 1 byte a line:
    no line is held in memory, so the peak grows by far less than the output."""
    n = 3000
    det = submit_wait(daemon, workflow(folder(workdir), _lines_body(n, 1)), check=0)
    assert det["state"] == "succeeded", det
    before = vm_hwm(daemon.proc.pid)
    det = submit_wait(daemon, workflow(folder(workdir), _lines_body(n, 16000)), check=0)
    assert det["state"] == "succeeded", det
    grown = vm_hwm(daemon.proc.pid) - before
    print(f"{n} lines of 16 kB split, after a {n}-line baseline: the daemon's VmHWM "
          f"{before} -> {before + grown} bytes")
    assert grown < 8 * 1024 * 1024, f"the daemon's peak memory grew by {grown} bytes"
    got = pull(daemon, det["id"], "out", os.path.join(workdir, "o"))
    assert got == [b"%016000d" % i for i in range(1, n + 1)]


def test_split_many_lines_keeps_their_order(daemon, workdir):
    """20,000 lines: collected off the daemon's loop, committed as one entry, applied
    in slices (flowd/run.py APPLY_SLICE): every line once, in order."""
    n = 20000
    before = vm_hwm(daemon.proc.pid)
    det = submit_wait(daemon, workflow(folder(workdir), f"""
  <channel name="out"/>
  <process name="p" image="flowd/busybox">
    <output channel="out" from="stdout" split="lines"/>
    <script>seq 1 {n}</script>
  </process>"""), check=0)
    assert det["state"] == "succeeded", det
    print(f"{n} lines split: the daemon's VmHWM {before} -> {vm_hwm(daemon.proc.pid)} bytes")
    got = pull(daemon, det["id"], "out", os.path.join(workdir, "o"))
    assert got == [str(i).encode() for i in range(1, n + 1)]


def test_max_split_lines_bounds_a_split_and_the_task_fails_with_that_reason(daemon_factory, workdir):
    """The daemon's max_split_lines (each item is a file: it bounds the inodes one task
    takes): an output of that many lines splits; one more line fails the task with a
    reason naming the setting, and its input is kept."""
    conf = write(os.path.join(workdir, "flowd.toml"), "max_split_lines = 1000\n")
    d = daemon_factory(extra_args=["--config", conf]).start()
    det = submit_wait(d, workflow(folder(workdir), f"""
  <channel name="n">{items("1000", "1001")}</channel><channel name="out"/>
  <process name="p" image="flowd/busybox" on-failure="continue">
    <input channel="n" as="N" value="yes"/>
    <output channel="out" from="stdout" split="lines"/>
    <script>seq 1 "$N"</script>
  </process>"""), check=0)
    assert det["state"] == "succeeded", det
    assert {c["name"]: c["depth"] for c in det["channels"]}["out"] == 1000
    assert det["tasks_failed"] == 1, det["failures"]
    [why] = reasons(det)["p"]
    assert "more than 1000 lines" in why and "max_split_lines" in why, why
    kept = glob.glob(os.path.join(d.spool, "**", "failed", "*", "in", "*"), recursive=True)
    assert [open(k, "rb").read() for k in kept] == [b"1001"]


# -- the example --------------------------------------------------------------------------------

def test_the_wordcount_values_example_counts_each_line(daemon, workdir):
    det = submit_wait(daemon, os.path.join(EXAMPLES, "wordcount-values", "workflow.xml"), check=0)
    assert det["state"] == "succeeded", det
    assert pull(daemon, det["id"], "report", os.path.join(workdir, "r")) == \
        [b"9 words\n", b"8 words\n", b"3 words\n", b"1 words\n", b"8 words\n"]


@pytest.mark.slow
def test_a_1_gib_stdout_passes_with_the_daemon_memory_flat(daemon, workdir):
    size = 1 << 30
    body = f"""
  <channel name="out"/>
  <process name="p" image="flowd/busybox">
    <output channel="out" from="stdout"/>
    <script>head -c {size} /dev/zero</script>
  </process>"""
    before = vm_hwm(daemon.proc.pid)
    det = submit_wait(daemon, workflow(folder(workdir), body), check=0)
    assert det["state"] == "succeeded", det
    assert vm_hwm(daemon.proc.pid) - before < 16 * 1024 * 1024
    detail = json.loads(daemon.flowctl("status", det["id"], "--json", check=0).stdout)
    assert {c["name"]: c["depth"] for c in detail["channels"]}["out"] == 1


# -- Swarm ---------------------------------------------------------------------------------------

@pytest.mark.swarm
def test_values_stdout_and_split_on_swarm_jobs(daemon_factory, workdir, docker_swarm):
    """executor = "swarm": values go in the job's Env, stdout is written by the
    wrapper into /task on the shared spool, so both work as locally."""
    from test_swarm import remove_spool_services

    conf = write(os.path.join(workdir, "flowd.toml"),
                 'executor = "swarm"\nmax_containers = 2\ndefault_memory = "64m"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    try:
        det = submit_wait(d, os.path.join(EXAMPLES, "wordcount-values", "workflow.xml"), check=0)
        assert det["state"] == "succeeded", det
        assert pull(d, det["id"], "report", os.path.join(workdir, "r")) == \
            [b"9 words\n", b"8 words\n", b"3 words\n", b"1 words\n", b"8 words\n"]
        det = submit_wait(d, workflow(folder(workdir), f"""
  <channel name="in">{items(*HOSTILE[:4])}</channel><channel name="out"/>
  <process name="p" image="flowd/busybox">
    <input channel="in" as="word" value="yes"/>
    <output channel="out" from="stdout"/>
    <script>printf '%s' "$word"; if [ -e /task/pwned ]; then echo PWNED; fi</script>
  </process>"""), check=0)
        assert det["state"] == "succeeded", det
        assert pull(d, det["id"], "out", os.path.join(workdir, "o")) == \
            [h.encode() for h in HOSTILE[:4]]
    finally:
        d.stop()
        remove_spool_services(docker_swarm, os.path.realpath(d.spool))
