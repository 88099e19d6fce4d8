"""flowctl report in a real browser: a real run (real engine, the non-root test
daemon) with a success, a retry and a failure whose log is hostile, made into a
page by ``flowctl report`` and loaded by Debian's headless Chromium; and a
synthetic 10,000-attempt page with hostile names and reasons.

What is checked is what a user would see: no script error (the page's
``window.onerror`` writes a marker into the DOM, read from ``--dump-dom``), one
timeline bar per trace row, nothing a container wrote turned into markup, and a
screenshot that is not blank.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import uuid
import zlib

import pytest

from daemon_fixtures import REPO

HOSTILE = "</script><img src=x onerror=document.body.setAttribute('data-pwned','1')>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need_chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is needed under CI (.ci/setup-host installs it)", pytrace=False)
        pytest.skip("no chromium (apt-get install chromium)")


def chromium(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Headless Chromium as root here: --no-sandbox; a profile of its own per call."""
    profile = os.path.join(os.environ.get("FLOWD_TEST_DIR") or os.path.join(REPO, ".test-tmp"),
                           "chromium-" + uuid.uuid4().hex[:8])
    try:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
             "--v=0", "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", *args],
            capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def load(page: str) -> str:
    """The DOM of the page once its script ran (checked: no script error, drawn)."""
    res = chromium("--dump-dom", "file://" + os.path.abspath(page))
    dom = res.stdout
    assert "<html" in dom, f"chromium printed no DOM (exit {res.returncode}):\n{res.stderr[-3000:]}"
    errors = re.findall(r'<div class="script-error"[^>]*>(.*?)</div>', dom)
    assert not errors, errors
    console = [line for line in res.stderr.splitlines()
               if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]
    assert not console, console
    assert re.search(r'<div id="report-ready" data-bars="\d+"', dom), dom[-2000:]
    assert "data-pwned" not in dom.split("</head>")[1].split(">", 1)[0]  # <body ...>
    assert not re.search(r"<img[^>]*onerror", dom)
    return dom


def bars(dom: str) -> int:
    return len(re.findall(r'<g class="bar ', dom))


def png_colours(path: str, step: int = 7) -> int:
    """How many different colours a PNG (8-bit RGB or RGBA) has, every ``step``-th pixel."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, ctype = header[:4]
    assert depth == 8 and ctype in (2, 6), header
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colours = set()
    i = 0
    for _ in range(height):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        for x in range(0, stride, bpp * step):
            colours.add(bytes(line[x:x + 3]))
        prev = line
    return len(colours)


@pytest.mark.docker
def test_report_of_a_real_run_in_chromium(docker_images, daemon, workdir):
    _need_chromium()
    folder = os.path.join(workdir, "wf")
    os.makedirs(folder)
    path = os.path.join(folder, "workflow.xml")
    hostile_xml = HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    with open(path, "w") as f:
        f.write(f"""<workflow name="reported">
  <channel name="seed"><item>1</item><item>2</item></channel>
  <channel name="a"/><channel name="b"/><channel name="c"/>
  <process name="fine" image="flowd/busybox">
    <input channel="seed"/><output channel="a" as="out"/>
    <script>echo fine &gt; out</script>
  </process>
  <process name="again" image="flowd/busybox" retries="1">
    <output channel="b" as="out"/>
    <script>[ "$FLOWD_ATTEMPT" = 2 ] || exit 5; echo ok &gt; out</script>
  </process>
  <process name="broken" image="flowd/busybox" on-failure="continue">
    <input channel="a"/><output channel="c" as="out"/>
    <script>echo "{hostile_xml}"; echo "{hostile_xml}" &gt;&amp;2; exit 9</script>
  </process>
</workflow>
""")
    res = daemon.flowctl("submit", "--wait", "--json", path)
    run = json.loads(res.stdout)
    rid = run["run"]["id"] if "run" in run else run["id"]
    rows = [json.loads(line) for line in daemon.flowctl("trace", rid, "--json", check=0).stdout.splitlines()]
    assert len(rows) == 6  # fine x2, again x2, broken x2
    page = os.path.join(workdir, "report.html")
    out = daemon.flowctl("report", rid, "-o", page, check=0)
    assert "6 task attempts" in out.stderr
    html = open(page, encoding="utf-8").read()
    # nothing fetched: no link out (the SVG namespace is a name, not a fetch), and a CSP that forbids it
    assert not re.search(r"(src|href|url)\s*[=(]\s*[\"']?(https?:)?//", html)
    assert "default-src 'none'" in html
    assert HOSTILE not in html  # only ever escaped
    dom = load(page)
    assert bars(dom) == len(rows)
    assert 'data-bars="6"' in dom
    assert dom.count('<div class="failure">') == 3  # again's first attempt, broken's two
    assert "&lt;/script&gt;&lt;img src=x onerror=" in dom  # the log tail, as text
    assert '<g class="node process">' in dom  # the graph
    shot = os.path.join(workdir, "report.png")
    chromium(f"--screenshot={shot}", "--window-size=1200,1400", "file://" + page)
    assert os.path.getsize(shot) > 10_000
    assert png_colours(shot) > 8
    if os.environ.get("FLOWD_REPORT_SCREENSHOT"):  # to refresh docs/report.png
        shutil.copy(shot, os.environ["FLOWD_REPORT_SCREENSHOT"])


def test_report_of_10000_attempts_with_hostile_names(tmp_path):
    """The page stays quick with 10,000 bars, and hostile strings in every
    field a user or container might choose stay text."""
    _need_chromium()
    from flowd import report

    rnd = random.Random(7)
    wf = _workflow()
    procs = list(wf["processes"])
    rows = []
    t = 1.7e9
    for i in range(10_000):
        q = t + i * 0.01
        s = q + rnd.random()
        f = s + rnd.random() * 3
        state = rnd.choice(["succeeded"] * 8 + ["failed", "oom", "timeout", "lost"])
        rows.append({"task": str(i) + (HOSTILE if i == 5 else ""), "process": rnd.choice(procs),
                     "attempt": 1, "state": state, "exit_status": 0 if state == "succeeded" else 1,
                     "reason": HOSTILE, "queued_at": q, "started_at": s, "finished_at": f,
                     "peak_memory": rnd.randint(1 << 20, 1 << 30), "cpu_seconds": rnd.random(),
                     "started_how": "fresh", "node": HOSTILE})
    run = {"id": "r" + HOSTILE, "name": "big", "state": "failed", "owner": HOSTILE,
           "message": HOSTILE, "elapsed": 120.0}
    page = tmp_path / "big.html"
    page.write_text(report.render(run, {"workflow": wf}, rows, {"5.1": HOSTILE * 3}))
    dom = load(str(page))
    assert bars(dom) == 10_000
    ms = int(re.search(r'data-ms="(\d+)"', dom).group(1))
    print(f"10,000 bars drawn in {ms} ms")


def _workflow() -> dict:
    from helpers import proc, wf

    return wf(channels={"src": ["x"], "a": [], "b": [], "c": [], "d": []},
              processes=[proc("split", "src", "a"), proc("work", "a", "b"),
                         proc("check", "a", "c"), proc("merge", "b c", "d")],
              muxes=[("d", "src")]).to_dict()
