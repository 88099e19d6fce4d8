"""The content cache (process@cache="yes", SPEC 6.5; flowd/cache.py) against the
real engine, the daemon run as the unit runs it (non-root flowd-test, see
daemon_fixtures): what a user checks with flowctl (pull, trace, why, cache ls,
cache rm, rm) and with the engine (which containers were created).

Scripts print something random (/proc/sys/kernel/random/uuid), so an output
that came from the cache is told apart from one a rerun made. Containers are
counted by the engine's own record (``docker events``, the run's label), so a
hit that started a container cannot pass. Waits are for conditions
(``submit --wait``), never for durations.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from xml.sax.saxutils import escape

import pytest

from daemon_fixtures import wait_until
from test_owners import cast  # noqa: F401  (the fixture: users of this machine)
from flowd.executor.container import LABEL_RUN

pytestmark = pytest.mark.docker
UUID = "cat /proc/sys/kernel/random/uuid"  # a rerun prints another one


@pytest.fixture(autouse=True)
def _needs_engine_and_image(docker_images):
    """Every test here needs the engine (fails under CI without it) and flowd/busybox."""


# -- helpers -----------------------------------------------------------------------------

def workflow(workdir: str, body: str, name: str = "cached", files: dict | None = None) -> str:
    folder = os.path.join(workdir, "wf-" + uuid.uuid4().hex[:6])
    os.makedirs(folder)
    for n, data in (files or {}).items():
        with open(os.path.join(folder, n), "wb") as f:
            f.write(data)
    path = os.path.join(folder, "workflow.xml")
    with open(path, "w") as f:
        f.write(f'<workflow name="{name}">{body}\n</workflow>\n')
    return path


def items(*values: str) -> str:
    return "".join(f"<item>{escape(v)}</item>" for v in values)


def submit_wait(d, path, **kw) -> dict:
    det = json.loads(d.flowctl("submit", "--wait", "--json", path, **kw).stdout)
    return det


def pull(d, run: str, channel: str, out: str, **kw) -> list[bytes]:
    d.flowctl("pull", run, channel, "--out", out, check=0, **kw)
    return sorted(open(os.path.join(out, n), "rb").read() for n in os.listdir(out))


def trace(d, run: str) -> list[dict]:
    res = d.flowctl("trace", run, "--json", check=0)
    return [json.loads(line) for line in res.stdout.splitlines()]


def how(rows: list[dict], process: str) -> list[str]:
    return sorted(r["started_how"] for r in rows if r["process"] == process)


def why(d, run: str, task: str) -> dict:
    return json.loads(d.flowctl("why", run, task, "--json", check=0).stdout)


def cache_ls(d) -> dict:
    return json.loads(d.flowctl("cache", "ls", "--json", check=0).stdout)


def containers_created(run: str, since: float) -> list[str]:
    """The containers the engine created for ``run`` since ``since`` (its own
    record: fresh and warm containers alike carry the run's label)."""
    res = subprocess.run(["docker", "events", "--since", f"{since:.3f}", "--until",
                          f"{time.time():.3f}", "--filter", "type=container", "--filter",
                          "event=create", "--filter", f"label={LABEL_RUN}={run}",
                          "--format", "{{.Actor.ID}}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def config(workdir: str, text: str) -> str:
    path = os.path.join(workdir, "flowd.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


# -- a hit ---------------------------------------------------------------------------------

HIT = f"""
  <channel name="words">{items("one", "two", "three")}</channel>
  <channel name="stamped"/><channel name="fwd"/><channel name="told"/>
  <process name="stamp" image="flowd/busybox" cache="yes">
    <input channel="words" as="w"/>
    <output channel="stamped" as="out"/><output channel="fwd" as="copy"/>
    <script>{{ cat w; {UUID}; }} &gt; out; cp out copy</script>
  </process>
  <process name="tell" image="flowd/busybox">
    <input channel="fwd" as="s"/><output channel="told" as="out"/>
    <script>{{ cat s; {UUID}; }} &gt; out</script>
  </process>
"""


def test_a_second_identical_run_is_cached_whole_with_no_container_and_rm_never_breaks_it(
        daemon, workdir):
    """The same workflow twice: the cached process's outputs are the first
    run's, trace says cached, no container ran for them, and why names where
    they came from. Then rm of the first run, and cache rm --all, break nothing."""
    path = workflow(workdir, HIT)
    t0 = time.time() - 1
    first = submit_wait(daemon, path, check=0)
    assert first["state"] == "succeeded", first
    second = submit_wait(daemon, path, check=0)
    assert second["state"] == "succeeded", second
    r1, r2 = first["id"], second["id"]

    stamped1 = pull(daemon, r1, "stamped", os.path.join(workdir, "s1"))
    stamped2 = pull(daemon, r2, "stamped", os.path.join(workdir, "s2"))
    assert len(stamped1) == 3 and len(set(stamped1)) == 3, stamped1
    assert stamped2 == stamped1, "the second run's outputs are the first's (not a rerun's)"
    told1 = pull(daemon, r1, "told", os.path.join(workdir, "t1"))
    told2 = pull(daemon, r2, "told", os.path.join(workdir, "t2"))
    assert not set(told1) & set(told2), "the process without cache= ran again"
    assert sorted(t.split(b"\n")[0] for t in told2) == sorted(s.split(b"\n")[0] for s in stamped1), \
        "the cached items went on downstream"

    rows1, rows2 = trace(daemon, r1), trace(daemon, r2)
    assert how(rows1, "stamp") == ["fresh"] * 3, rows1
    assert how(rows2, "stamp") == ["cached"] * 3, rows2
    assert how(rows2, "tell") == ["fresh"] * 3, rows2
    assert all(r["state"] == "succeeded" for r in rows2), rows2
    # the engine's record: 6 containers for the first run, only `tell`'s 3 for the second
    made1 = containers_created(r1, t0)
    made2 = containers_created(r2, t0)
    assert len(made1) == 6, made1
    assert len(made2) == 3, made2
    procs2 = {subprocess.run(["docker", "events", "--since", f"{t0:.3f}", "--until",
                              f"{time.time():.3f}", "--filter", f"container={c}", "--filter",
                              "event=create", "--format",
                              '{{index .Actor.Attributes "io.flowd.process"}}'],
                             capture_output=True, text=True).stdout.strip() for c in made2}
    assert procs2 == {"tell"}, procs2

    # why: a cached task names the run and task it came from (the same word's task)
    src_of = {r["task"]: r for r in rows1 if r["process"] == "stamp"}
    for row in (r for r in rows2 if r["process"] == "stamp"):
        w = why(daemon, r2, row["task"])
        assert w["cached"] is True, w
        assert w["from"]["run"] == r1 and w["from"]["task"] in src_of, w
        text = daemon.flowctl("why", r2, row["task"], check=0).stdout
        assert f"from run {r1} task {w['from']['task']}" in text, text
    # the first run's stamp tasks ran: nothing in the cache before them
    w = why(daemon, r1, rows1[0]["task"] if rows1[0]["process"] == "stamp"
            else next(r["task"] for r in rows1 if r["process"] == "stamp"))
    assert w["cached"] is False and "no earlier task" in w["message"], w
    # a process without cache= says so
    w = why(daemon, r2, next(r["task"] for r in rows2 if r["process"] == "tell"))
    assert "does not use the cache" in w["message"], w

    ls = cache_ls(daemon)
    assert ls["entries"] == 3 and [p["process"] for p in ls["processes"]] == ["cached/stamp"], ls
    assert ls["size"] == 2 * sum(len(s) for s in stamped1), ls  # out and copy

    # a task that is not there: a clear error, no traceback
    res = daemon.flowctl("why", r2, "nope")
    assert res.returncode != 0 and "has no task 'nope'" in res.stderr, res
    assert "Traceback" not in res.stderr

    # rm of the first run: the entries keep their own links; a third run, after a
    # restart of the daemon, still hits, whole
    daemon.flowctl("rm", r1, check=0)
    assert daemon.stop() == 0
    daemon.start()
    third = submit_wait(daemon, path, check=0)
    assert third["state"] == "succeeded", third
    r3 = third["id"]
    assert how(trace(daemon, r3), "stamp") == ["cached"] * 3
    assert pull(daemon, r3, "stamped", os.path.join(workdir, "s3")) == stamped1
    assert len(containers_created(r3, t0)) == 3  # tell's only

    # cache rm --all: every entry goes, and no run's items with them
    res = json.loads(daemon.flowctl("cache", "rm", "--all", "--json", check=0).stdout)
    assert res["removed"] == 3 and res["own_only"] is False, res
    assert cache_ls(daemon)["entries"] == 0
    assert pull(daemon, r2, "stamped", os.path.join(workdir, "s2b")) == stamped1
    assert pull(daemon, r3, "stamped", os.path.join(workdir, "s3b")) == stamped1
    assert pull(daemon, r3, "told", os.path.join(workdir, "t3b"))  # downstream items too
    # and with the cache empty, the process runs again
    fourth = submit_wait(daemon, path, check=0)
    assert how(trace(daemon, fourth["id"]), "stamp") == ["fresh"] * 3
    assert pull(daemon, fourth["id"], "stamped", os.path.join(workdir, "s4")) != stamped1


# -- misses, and why -----------------------------------------------------------------------

def make_image(docker_client, tag: str, label: str) -> str:
    """A tiny image FROM flowd/busybox with one more LABEL, tagged ``tag``; its id."""
    cid = docker_client.api.create_container("flowd/busybox:latest", ["true"])["Id"]
    try:
        repo, t = tag.rsplit(":", 1)
        docker_client.api.commit(cid, repository=repo, tag=t, changes=[f"LABEL flowd.cachetest={label}"])
    finally:
        docker_client.api.remove_container(cid, force=True)
    return docker_client.api.inspect_image(tag)["Id"]


def misses_body(image: str, script: str, env: str, word: str) -> str:
    """Four processes with cache="yes", each to have one part of its key changed."""
    return f"""
  <channel name="a">{items("same")}</channel><channel name="b">{items("same")}</channel>
  <channel name="c">{items("same")}</channel><channel name="d">{items(word)}</channel>
  <channel name="oa"/><channel name="ob"/><channel name="oc"/><channel name="od"/>
  <process name="by-image" image="{image}" cache="yes">
    <input channel="a" as="x"/><output channel="oa" as="out"/>
    <script>{UUID} &gt; out</script>
  </process>
  <process name="by-script" image="flowd/busybox" cache="yes">
    <input channel="b" as="x"/><output channel="ob" as="out"/>
    <script>{script} &gt; out</script>
  </process>
  <process name="by-env" image="flowd/busybox" cache="yes">
    <input channel="c" as="x"/><output channel="oc" as="out"/>
    <env name="MOOD" value="{env}"/><env name="KEPT" value="same"/>
    <script>{{ echo "$MOOD"; {UUID}; }} &gt; out</script>
  </process>
  <process name="by-input" image="flowd/busybox" cache="yes">
    <input channel="d" as="x"/><output channel="od" as="out"/>
    <script>{{ cat x; {UUID}; }} &gt; out</script>
  </process>
"""


def test_a_miss_names_the_part_of_the_key_that_differed(daemon, workdir, docker_client):
    """Image rebuilt, script edited, env changed, input changed: each process
    runs again, and `flowctl why` names its one difference and nothing else."""
    tag = f"flowd-cachetest/img-{uuid.uuid4().hex[:8]}:latest"
    ids: list[str] = []
    try:
        ids.append(make_image(docker_client, tag, "one"))
        before = submit_wait(daemon, workflow(workdir, misses_body(tag, f"{UUID}", "calm", "first")),
                             check=0)
        assert before["state"] == "succeeded", before
        ids.append(make_image(docker_client, tag, "two"))
        assert ids[0] != ids[1]
        after = submit_wait(daemon, workflow(workdir, misses_body(
            tag, f"echo edited; {UUID}", "glad", "second")), check=0)
        assert after["state"] == "succeeded", after
    finally:
        for i in reversed(ids):
            subprocess.run(["docker", "rmi", "-f", i], capture_output=True)
    r1, r2 = before["id"], after["id"]
    rows1 = {r["process"]: r for r in trace(daemon, r1)}
    rows2 = {r["process"]: r for r in trace(daemon, r2)}
    assert {p: r["started_how"] for p, r in rows2.items()} == dict.fromkeys(rows2, "fresh"), rows2
    assert len(rows2) == 4

    got = {p: why(daemon, r2, r["task"]) for p, r in rows2.items()}
    for p, w in got.items():
        assert w["cached"] is False, w
        assert w["compared_with"] == {"run": r1, "task": rows1[p]["task"]}, w
        assert len(w["differences"]) == 1, w  # the one part changed, nothing else

    [d] = got["by-image"]["differences"]
    assert d.startswith(f"image `{tag}` now has id {ids[1]} (it was {ids[0]}"), d
    [d] = got["by-script"]["differences"]
    new, old = (hashlib.sha256(s.encode()).hexdigest()[:12]
                for s in (f"echo edited; {UUID} > out", f"{UUID} > out"))
    assert d.startswith("the script differs") and new in d and old in d, d
    assert got["by-env"]["differences"] == ["env `MOOD` has another value"], got["by-env"]
    assert "glad" not in json.dumps(got["by-env"]), "an env's value is never shown"
    [d] = got["by-input"]["differences"]
    new, old = (hashlib.sha256(w.encode()).hexdigest()[:12] for w in ("second", "first"))
    assert d.startswith(f"input `x` differs (sha256 {new}") and f"it was {old}" in d, d

    # the words a user reads
    text = daemon.flowctl("why", r2, rows2["by-env"]["task"], check=0).stdout
    assert text.strip() == (f"task {rows2['by-env']['task']} ran; compared with run {r1} task "
                            f"{rows1['by-env']['task']}: env `MOOD` has another value"), text


def test_a_failed_task_is_never_cached(daemon, workdir):
    """A task that failed (and wrote an output first) runs again in the next run;
    one that failed once and then succeeded is cached from its success."""
    body = """
  <channel name="in">""" + items("x") + """</channel><channel name="o1"/><channel name="o2"/>
  <process name="fails" image="flowd/busybox" cache="yes" on-failure="continue">
    <input channel="in" as="x"/><output channel="o1" as="out"/>
    <script>echo partial &gt; out; exit 1</script>
  </process>
  <process name="once" image="flowd/busybox" cache="yes" retries="1">
    <output channel="o2" as="out"/>
    <script>[ "$FLOWD_ATTEMPT" = 2 ] || { echo partial &gt; out; exit 1; }; """ + UUID + """ &gt; out</script>
  </process>
"""
    path = workflow(workdir, body)
    t0 = time.time() - 1
    runs = [submit_wait(daemon, path, check=0) for _ in range(2)]
    for det in runs:
        assert det["state"] == "succeeded" and det["tasks_failed"] == 1, det
    r1, r2 = runs[0]["id"], runs[1]["id"]
    rows2 = trace(daemon, r2)
    fails = [r for r in rows2 if r["process"] == "fails"]
    assert [(r["started_how"], r["state"]) for r in fails] == [("fresh", "failed")], rows2
    assert len(containers_created(r2, t0)) == 1, "the failed task ran again, and only it"
    assert how(rows2, "once") == ["cached"], rows2
    w = why(daemon, r2, fails[0]["task"])
    assert w["cached"] is False and "no earlier task" in w["message"], w
    once1 = [r for r in trace(daemon, r1) if r["process"] == "once"]
    assert [r["state"] for r in once1] == ["failed", "succeeded"], once1
    w = why(daemon, r2, next(r["task"] for r in rows2 if r["process"] == "once"))
    assert w["from"] == {"run": r1, "task": once1[-1]["task"]}, w
    assert pull(daemon, r2, "o2", os.path.join(workdir, "o2")) == \
        pull(daemon, r1, "o2", os.path.join(workdir, "o1"))
    assert [p["process"] for p in cache_ls(daemon)["processes"]] == ["cached/once"]


# -- bounds ------------------------------------------------------------------------------------

def test_eviction_keeps_the_cache_within_cache_max_size_least_recently_used_first(
        daemon_factory, workdir):
    """cache_max_size 8k, outputs of 3000 bytes: a, b, then a again (used), then c:
    b goes, not a (the older). A reload that lowers the bound evicts at once."""
    conf = config(workdir, 'cache_max_size = "8k"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()

    def body(*words):
        return f"""
  <channel name="in">{items(*words)}</channel><channel name="out"/>
  <process name="big" image="flowd/busybox" cache="yes">
    <input channel="in" as="w"/><output channel="out" as="o"/>
    <script>head -c 3000 /dev/urandom &gt; o</script>
  </process>"""

    outs: dict[str, bytes] = {}
    for word in ("a", "b", "a", "c"):
        det = submit_wait(d, workflow(workdir, body(word)), check=0)
        assert det["state"] == "succeeded", det
        [got] = pull(d, det["id"], "out", os.path.join(workdir, uuid.uuid4().hex))
        assert len(got) == 3000
        if word in outs:
            assert got == outs[word], "a was a hit"
        outs[word] = got
        ls = cache_ls(d)
        assert ls["size"] <= 8192 and ls["max_size"] == 8192, ls
    assert (ls["entries"], ls["size"], ls["evicted"]) == (2, 6000, 1), ls
    text = d.flowctl("cache", "ls", check=0).stdout
    assert "cached/big" in text and "2 entries" in text and "at most 8.0" in text, text

    # a and c are still there (hits: nothing stored, nothing evicted); b was evicted: it runs
    det = submit_wait(d, workflow(workdir, body("a", "c")), check=0)
    assert how(trace(d, det["id"]), "big") == ["cached", "cached"]
    assert pull(d, det["id"], "out", os.path.join(workdir, "ac")) == sorted([outs["a"], outs["c"]])
    det = submit_wait(d, workflow(workdir, body("b")), check=0)
    assert how(trace(d, det["id"]), "big") == ["fresh"]
    assert pull(d, det["id"], "out", os.path.join(workdir, "b")) != [outs["b"]]
    ls = cache_ls(d)
    assert (ls["entries"], ls["size"], ls["evicted"]) == (2, 6000, 2), ls

    # a reload that lowers the bound evicts down to it
    config(workdir, 'cache_max_size = "4k"\n')
    d.proc.send_signal(signal.SIGHUP)
    ls = wait_until(lambda: (lambda ls: ls if ls["max_size"] == 4096 else None)(cache_ls(d)),
                    60, "the reload")
    assert ls["entries"] == 1 and ls["size"] == 3000, ls


# -- values ------------------------------------------------------------------------------------

def test_values_in_sh_and_python_fresh_and_warm_are_cached_and_a_hit_runs_nothing(
        daemon, workdir, python_image):
    body = ""
    for mode in ("fresh", "warm"):
        body += f"""
  <channel name="sh_{mode}">{items("it's", "$(id)")}</channel><channel name="sh_{mode}_out"/>
  <process name="sh-{mode}" image="flowd/busybox" container="{mode}" cache="yes">
    <input channel="sh_{mode}" as="word" value="yes"/>
    <output channel="sh_{mode}_out" from="stdout"/>
    <script>printf '%s ' "$word"; {UUID}</script>
  </process>
  <channel name="py_{mode}">{items("it's", "$(id)")}</channel><channel name="py_{mode}_out"/>
  <process name="py-{mode}" image="{python_image}" lang="python" container="{mode}" cache="yes">
    <input channel="py_{mode}" as="word" value="yes"/>
    <output channel="py_{mode}_out" from="stdout"/>
    <script>
      import os, uuid
      print(os.environ["word"], uuid.uuid4())
    </script>
  </process>"""
    body += f"""
  <channel name="sp">{items("x", "y")}</channel><channel name="sp_out"/>
  <process name="sh-split" image="flowd/busybox" cache="yes">
    <input channel="sp" as="word" value="yes"/>
    <output channel="sp_out" from="stdout" split="lines"/>
    <script>echo "$word"; {UUID}</script>
  </process>"""
    path = workflow(workdir, body, name="valued")
    t0 = time.time() - 1
    first = submit_wait(daemon, path, check=0)
    assert first["state"] == "succeeded", first
    second = submit_wait(daemon, path, check=0)
    assert second["state"] == "succeeded", second
    rows1, rows2 = trace(daemon, first["id"]), trace(daemon, second["id"])
    assert sorted(r["started_how"] for r in rows1) == ["fresh"] * 6 + ["warm"] * 4, rows1
    assert [r["started_how"] for r in rows2] == ["cached"] * 10, rows2
    assert containers_created(first["id"], t0), "the check sees the first run's containers"
    assert containers_created(second["id"], t0) == [], "a hit, warm or fresh, runs nothing"
    for lang in ("sh", "py"):
        for mode in ("fresh", "warm"):
            ch = f"{lang}_{mode}_out"
            one = pull(daemon, first["id"], ch, os.path.join(workdir, "1" + ch))
            two = pull(daemon, second["id"], ch, os.path.join(workdir, "2" + ch))
            assert one == two and len(one) == 2, (ch, one, two)
            assert sorted(o.split(b" ")[0] for o in one) == [b"$(id)", b"it's"], one
    split = [pull(daemon, r, "sp_out", os.path.join(workdir, "sp" + r)) for r in (first["id"], second["id"])]
    assert split[0] == split[1] and len(split[0]) == 4, split  # two lines each, one item a line
    assert [b"x", b"y"] == [i for i in split[1] if i in (b"x", b"y")], split


# -- who may remove entries ------------------------------------------------------------------

def test_cache_rm_by_a_user_removes_only_the_entries_of_their_own_runs(daemon_factory, workdir,
                                                                      cast):
    from test_owners import OTHER, OWNER
    d = daemon_factory().start()
    os.chmod(workdir, 0o755)
    runs = {}
    for who, pw in ((OWNER, cast.owner), (OTHER, cast.other)):
        path = workflow(workdir, f"""
  <channel name="in">{items(who)}</channel><channel name="out"/>
  <process name="p" image="flowd/busybox" cache="yes">
    <input channel="in" as="w"/><output channel="out" as="o"/>
    <script>{UUID} &gt; o</script>
  </process>""", name=f"wf-{who}")
        os.chmod(os.path.dirname(path), 0o755)
        os.chmod(path, 0o644)
        det = json.loads(d.flowctl("submit", "--wait", "--json", path, as_user=pw, check=0).stdout)
        assert det["state"] == "succeeded", det
        runs[who] = det["id"]
    assert cache_ls(d)["entries"] == 2

    res = d.flowctl("cache", "rm", "--all", as_user=cast.other, check=0).stdout
    assert res.startswith("removed 1 cache entries") and "of your own runs" in res, res
    assert [p["process"] for p in cache_ls(d)["processes"]] == [f"wf-{OWNER}/p"]
    res = json.loads(d.flowctl("cache", "rm", "--process", "p", "--json", as_user=cast.other,
                               check=0).stdout)
    assert res["removed"] == 0 and res["own_only"] is True, res
    assert cache_ls(d)["entries"] == 1, "another user's entry stays"
    res = json.loads(d.flowctl("cache", "rm", "--process", "p", "--json", as_user=cast.owner,
                               check=0).stdout)
    assert res["removed"] == 1, res
    assert cache_ls(d)["entries"] == 0


# -- faults found by these tests, now fixed ------------------------------------------------------

def test_why_names_the_image_the_process_uses_now_when_its_image_changed(daemon, workdir,
                                                                         docker_client):
    tag = f"flowd-cachetest/img-{uuid.uuid4().hex[:8]}:latest"

    def body(image):
        return f"""
  <channel name="in">{items("x")}</channel><channel name="out"/>
  <process name="p" image="{image}" cache="yes">
    <input channel="in" as="x"/><output channel="out" as="o"/>
    <script>{UUID} &gt; o</script>
  </process>"""
    new = make_image(docker_client, tag, "other")
    try:
        runs = [submit_wait(daemon, workflow(workdir, body(image)), check=0)
                for image in ("flowd/busybox", tag)]
    finally:
        subprocess.run(["docker", "rmi", "-f", new], capture_output=True)
    task = trace(daemon, runs[1]["id"])[0]["task"]
    [d] = why(daemon, runs[1]["id"], task)["differences"]
    # the image the process names now, and the one it named then (not "flowd/busybox now has id X")
    assert d.startswith(f"the image is `{tag}` (id {new}); it was `flowd/busybox`"), d


def test_an_output_bigger_than_the_whole_cache_does_not_empty_it(daemon_factory, workdir):
    conf = config(workdir, 'cache_max_size = "8k"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()

    def body(word, size):
        return f"""
  <channel name="in">{items(word)}</channel><channel name="out"/>
  <process name="p" image="flowd/busybox" cache="yes">
    <input channel="in" as="w"/><output channel="out" as="o"/>
    <script>head -c {size} /dev/urandom &gt; o</script>
  </process>"""
    assert submit_wait(d, workflow(workdir, body("small", 3000)), check=0)["state"] == "succeeded"
    assert cache_ls(d)["entries"] == 1
    assert submit_wait(d, workflow(workdir, body("huge", 10000)), check=0)["state"] == "succeeded"
    ls = cache_ls(d)
    assert (ls["entries"], ls["size"]) == (1, 3000), ls
