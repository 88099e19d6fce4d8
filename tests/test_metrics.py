"""``flowctl metrics`` and config ``metrics_listen``: the Prometheus text format,
parsed by the prometheus_client library's parser (a test dependency only)."""
from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

import pytest
from daemon_fixtures import wait_until
from helpers import write_file as write
from prometheus_client import parser  # .ci/setup-host installs it (tests only)

from flowd import metrics as M
from flowd.config import load
from flowd.errors import UsageError


WF = """<workflow name="m">
  <channel name="in"><item>a</item><item>b</item><item>c</item></channel>
  <channel name="out"/><channel name="bad"/>
  <process name="copy" image="flowd/busybox">
    <input channel="in"/><output channel="out"/>
    <script>cp in out</script>
  </process>
  <process name="boom" image="flowd/busybox" retries="1">
    <input channel="out"/><output channel="bad"/>
    <script>exit 3</script>
  </process>
</workflow>
"""


def samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value}, through the client library's parser."""
    out = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.docker
def test_the_http_scrape_matches_status(daemon_factory, workdir, docker_images):
    port = free_port()
    cfg = write(os.path.join(workdir, "m.toml"), f'metrics_listen = "127.0.0.1:{port}"\n')
    d = daemon_factory(extra_args=["--config", cfg]).start()
    run = d.flowctl("submit", write(os.path.join(workdir, "wf", "m.xml"), WF), check=0).stdout.strip()
    d.flowctl("watch", run, check=1)  # boom fails: the run fails
    detail = json.loads(d.flowctl("status", run, "--json", check=0).stdout)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    got = samples(text)
    state = detail["state"]
    assert got[("flowd_runs", frozenset({("state", state)}))] == 1
    assert got[("flowd_runs", frozenset({("state", "running")}))] == 0
    procs = {p["name"]: p for p in detail["processes"]}
    done = ("flowd_tasks_succeeded_total", frozenset({("process", "copy")}))
    assert got[done] == procs["copy"]["done"] == 3
    assert got[("flowd_tasks_failed_total", frozenset({("process", "boom")}))] == procs["boom"]["failed"]
    assert got[("flowd_tasks_retried_total", frozenset({("process", "boom")}))] >= 1
    started = got[("flowd_tasks_started_total", frozenset({("process", "boom")}))]
    assert started == got[("flowd_tasks_retried_total", frozenset({("process", "boom")}))] \
        + got[("flowd_tasks_failed_total", frozenset({("process", "boom")}))]
    assert got[("flowd_task_duration_seconds_count", frozenset({("process", "copy")}))] == 3
    assert got[("flowd_task_duration_seconds_bucket",
                frozenset({("process", "copy"), ("le", "+Inf")}))] == 3
    assert got[("flowd_dead_letters", frozenset({("run", run)}))] == len(detail["failures"])
    assert got[("flowd_docker_engine_up", frozenset())] == 1
    assert got[("flowd_spool_free_bytes", frozenset())] > 0
    assert got[("flowd_loop_seconds_count", frozenset())] > 0
    assert got[("flowd_containers_running", frozenset({("kind", "fresh")}))] == 0
    # flowctl metrics prints the same families
    fams = {f.name for f in parser.text_string_to_metric_families(d.flowctl("metrics", check=0).stdout)}
    assert fams == {f.name for f in parser.text_string_to_metric_families(text)}
    # only GET /metrics
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=30)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x"),
                               timeout=30)
    assert err.value.code == 501  # POST: http.server's "unsupported method"


@pytest.mark.docker
def test_channel_depths_of_a_live_run(daemon_factory, workdir, docker_images):
    d = daemon_factory().start()
    svc = WF.replace('name="m"', 'name="m" mode="service"').replace("cp in out", "sleep 600")
    run = d.flowctl("submit", write(os.path.join(workdir, "wf", "s.xml"), svc), check=0).stdout.strip()
    got = wait_until(lambda: (lambda g: g if g.get(("flowd_containers_running",
                                                    frozenset({("kind", "fresh")}))) else None)(
        samples(d.flowctl("metrics", check=0).stdout)), what="a container to run")
    detail = json.loads(d.flowctl("status", run, "--json", check=0).stdout)
    depths = {c["name"]: c["depth"] for c in detail["channels"]}
    assert got[("flowd_channel_depth", frozenset({("run", run), ("channel", "out")}))] == depths["out"]
    assert ("flowd_channel_depth", frozenset({("run", run), ("channel", "in")})) in got
    assert got[("flowd_runs", frozenset({("state", "running")}))] == 1
    d.flowctl("cancel", run, check=0)


def test_a_non_loopback_address_is_refused_unless_public(daemon_factory, workdir):
    cfg = write(os.path.join(workdir, "pub.toml"), 'metrics_listen = "0.0.0.0:9464"\n')
    with pytest.raises(UsageError) as err:
        load(cfg)
    assert "metrics_listen" in str(err.value) and "metrics_listen_public = true" in str(err.value)
    d = daemon_factory(extra_args=["--config", cfg]).start(wait=False)
    assert d.proc.wait(60) == 2
    assert "not a loopback address" in d.log()
    write(cfg, 'metrics_listen = "0.0.0.0:9464"\nmetrics_listen_public = true\n')
    assert load(cfg).metrics_listen == "0.0.0.0:9464"


def test_listen_addresses():
    assert M.parse_listen("127.0.0.1:9464", False) == ("127.0.0.1", 9464)
    assert M.parse_listen("[::1]:9464", False) == ("::1", 9464)
    assert M.parse_listen("localhost:1", False) == ("127.0.0.1", 1)
    for bad in ("9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "example.org:9464",
                "10.0.0.1:9464", "[::]:9464"):
        with pytest.raises(ValueError):
            M.parse_listen(bad, False)
    assert M.parse_listen("10.0.0.1:9464", True) == ("10.0.0.1", 9464)


def test_label_values_are_escaped_as_the_format_says():
    hostile = 'a "quoted" back\\slash\nnew line {x="y"} # not a comment'
    t = M._Text()
    t.family("flowd_test", "gauge", "a test")
    t.sample("flowd_test", 3, run=hostile)
    text = "\n".join(t.lines) + "\n"
    assert text.count("\n") == 3  # the newline is escaped: one sample line
    (fam,) = parser.text_string_to_metric_families(text)
    assert fam.samples[0].labels == {"run": hostile} and fam.samples[0].value == 3
