"""The daemon's metrics in the Prometheus text exposition format (0.0.4), for
``flowctl metrics`` and, with config ``metrics_listen``, at ``/metrics`` over HTTP.

The text is written here, not with the prometheus_client library: it is a
few dozen lines of plain text (``# HELP``, ``# TYPE``, ``name{label="value"}
number``), the daemon gains no dependency, and the values are computed on
demand from what the daemon holds (runs and depths from the spool's runs,
counters from flowd/events.py) rather than kept twice. Label values are
escaped as the format says (backslash, double quote, newline); names are
fixed here. Counters start at 0 when the daemon starts
(``flowd_start_time_seconds`` says when).

The HTTP server is one thread (http.server) answering ``GET /metrics`` only:
it never touches the daemon's state itself but hands the rendering to the
loop (``Daemon.report``, as executor threads do) and waits for it, so what it
serves is the loop's consistent picture. A request line or header over
http.server's bounds (64 KiB, 100 headers) is refused by it; each connection
has a timeout. A non-loopback address is refused unless the config says
``metrics_listen_public = true``.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time

from .errors import UsageError

log = logging.getLogger("flowd")

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
HTTP_TIMEOUT = 10.0  # seconds a connection may take; and the loop, to render
_STARTED = time.time()


def escape(value: object) -> str:
    """A label value as the exposition format writes it inside double quotes."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels) -> None:
        if labels:
            body = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{body}}} {_num(value)}")
        else:
            self.lines.append(f"{name} {_num(value)}")

    def histogram(self, name: str, hist, **labels) -> None:
        for bound, count in zip(hist.bounds, hist.counts):
            self.sample(name + "_bucket", count, **labels, le=_num(float(bound)))
        self.sample(name + "_bucket", hist.count, **labels, le="+Inf")
        self.sample(name + "_sum", hist.sum, **labels)
        self.sample(name + "_count", hist.count, **labels)


def render(d) -> str:
    """The metrics text, from the daemon ``d`` (in its loop)."""
    t = _Text()
    c = d.hub.metrics
    t.family("flowd_start_time_seconds", "gauge", "When this daemon started (Unix time); counters start at 0 then")
    t.sample("flowd_start_time_seconds", round(_STARTED, 3))
    t.family("flowd_runs", "gauge", "Runs in the spool, by state")
    by_state = dict.fromkeys(STATES, 0)
    for run in d.runs.values():
        by_state[run.state] = by_state.get(run.state, 0) + 1
    for state, n in by_state.items():
        t.sample("flowd_runs", n, state=state)
    for what in ("started", "succeeded", "failed", "retried"):
        name = f"flowd_tasks_{what}_total"
        t.family(name, "counter", f"Task attempts {what} since the daemon started, by process"
                 + (" (failed: given up, a dead letter)" if what == "failed" else
                    " (retried: the attempt failed and the task runs again)" if what == "retried" else ""))
        for process in sorted(c.tasks):
            t.sample(name, c.tasks[process][what], process=process)
    t.family("flowd_task_duration_seconds", "histogram",
             "Seconds from a task attempt's start to its end (succeeded, failed or retried), by process")
    for process in sorted(c.durations):
        t.histogram("flowd_task_duration_seconds", c.durations[process], process=process)
    t.family("flowd_channel_depth", "gauge", "Items waiting in each channel of each unfinished run")
    for run in d.runs.values():
        if not run.finished:
            for ch in run.wf.channels:
                t.sample("flowd_channel_depth", run.sched.depth(ch), run=run.id, channel=ch)
    t.family("flowd_dead_letters", "gauge", "Dead letters (failed tasks kept under failed/) of each run that has any")
    for run in d.runs.values():
        if run.failures.letters:
            t.sample("flowd_dead_letters", len(run.failures.letters), run=run.id)
    pool = d.executor.status() if d.executor is not None else {}
    warm = pool.get("warm") if isinstance(pool.get("warm"), dict) else {}
    t.family("flowd_containers_running", "gauge",
             "Containers running, by kind (fresh: one per task; warm: kept; swarm: Swarm jobs)")
    t.sample("flowd_containers_running", _int(pool.get("fresh")), kind="fresh")
    t.sample("flowd_containers_running", _int(warm.get("containers")), kind="warm")
    t.sample("flowd_containers_running", _int(pool.get("swarm")), kind="swarm")
    t.family("flowd_docker_engine_up", "gauge", "1 if the Docker engine answers, else 0")
    t.sample("flowd_docker_engine_up", 1 if d.engine_up else 0)
    t.family("flowd_spool_free_bytes", "gauge", "Free bytes on the spool's filesystem")
    t.sample("flowd_spool_free_bytes", _int(d.disk._free()))
    t.family("flowd_loop_seconds", "histogram", "Seconds each turn of the daemon's loop took "
             "(a request waits at most one turn)")
    t.histogram("flowd_loop_seconds", c.loop)
    t.family("flowd_loop_seconds_max", "gauge", "The longest turn of the loop since the daemon started")
    t.sample("flowd_loop_seconds_max", round(c.loop_max, 6))
    t.family("flowd_event_readers", "gauge", "Event stream subscriptions open (flowctl events, watch)")
    t.sample("flowd_event_readers", len(d.hub.subs))
    return "\n".join(t.lines) + "\n"


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


# -- config metrics_listen ----------------------------------------------------
def parse_listen(value: str, public: bool) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 address in brackets) -> (host, port), or ValueError
    saying what is wrong; a non-loopback host unless ``public``."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('must be "HOST:PORT", e.g. "127.0.0.1:9464" (empty: no HTTP metrics)')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return "127.0.0.1", int(port)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address (fix: e.g. \"127.0.0.1:{port}\", or an "
                         "address of this machine)") from None
    if not addr.is_loopback and not public:
        raise ValueError(f"{host} is not a loopback address: anyone who reaches it could read the "
                         "metrics (run ids, process names); set metrics_listen_public = true to "
                         "serve them there anyway, or listen on 127.0.0.1 behind a proxy")
    return host, int(port)


def serve_metrics(d):
    """Start the HTTP server of config ``metrics_listen`` (None when it is empty)."""
    value = getattr(d.cfg, "metrics_listen", "")
    if not value:
        return None
    try:
        host, port = parse_listen(value, getattr(d.cfg, "metrics_listen_public", False))
    except ValueError as e:
        raise UsageError(f"metrics_listen = {value!r}: {e}") from None
    server = MetricsServer(d, host, port)
    log.info("metrics served at http://%s/metrics", value)
    return server


class MetricsServer:
    """``GET /metrics`` on one thread; the text is rendered by the loop."""

    def __init__(self, d, host: str, port: int):
        import http.server
        import socket

        self.d = d
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = HTTP_TIMEOUT  # the connection's socket timeout (a slow client is dropped)
            server_version = "flowd"
            sys_version = ""

            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] != "/metrics":
                    return self._send(404, b"not found: flowd serves /metrics only\n")
                text = outer.text()
                if text is None:
                    return self._send(503, b"flowd's loop did not answer in time\n")
                self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

            def _send(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8"):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, format, *args):  # noqa: A002 - quiet: no line per scrape
                pass

        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(http.server.HTTPServer):
            address_family = family
            allow_reuse_address = True

        try:
            self.httpd = Server((host, port), Handler)
        except OSError as e:
            raise UsageError(f"metrics_listen: cannot listen on {host}:{port}: {e.strerror} "
                             "(fix: another port, or stop what uses it)") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="flowd-metrics",
                                       daemon=True)
        self.thread.start()

    def text(self) -> str | None:
        """The metrics text, rendered in the daemon's loop; None if it takes too long."""
        done = threading.Event()
        box: list[str] = []

        def job():
            try:
                box.append(render(self.d))
            finally:
                done.set()

        self.d.report(job)
        return box[0] if done.wait(HTTP_TIMEOUT) and box else None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
