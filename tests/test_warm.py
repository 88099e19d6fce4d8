"""Warm containers against the real engine, with the daemon run as the unit runs it."""
from __future__ import annotations

import json
import os
import re

import pytest

from daemon_fixtures import REPO

EXAMPLES = os.path.join(REPO, "examples")


def submit_wait(daemon, path, *args):
    out = daemon.flowctl("submit", "--wait", "--json", path, *args, check=None)
    return json.loads(out.stdout)


def test_wordcount_example_in_warm_containers_gives_what_fresh_gives(daemon_factory, workdir):
    conf = os.path.join(workdir, "flowd.toml")
    with open(conf, "w") as f:
        f.write('default_container = "warm"\n')
    d = daemon_factory(extra_args=["--config", conf]).start()
    detail = submit_wait(d, os.path.join(EXAMPLES, "wordcount", "workflow.xml"))
    assert detail["state"] == "succeeded", detail
    out = os.path.join(workdir, "tally")
    d.flowctl("pull", detail["id"], "report", "--out", out, check=0)
    report = [open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))]
    assert [re.sub(rb"task \w+: ", b"", r).strip() for r in report] == \
        [b"9 words", b"8 words", b"4 words", b"8 words"]
    status = d.flowctl("status", check=0).stdout
    assert "warm" in status
