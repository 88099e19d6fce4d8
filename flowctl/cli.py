"""flowctl: talk to the flowd daemon (docs/flowctl.md).

Exit status: 0 success; 1 the run failed (``--wait``) or the command failed;
2 bad usage or an invalid workflow; 3 the daemon did not answer; 130 Ctrl-C.
This module imports neither docker nor lxml: ``validate`` and ``submit``
load the parser only when they run.

Every string that a container, another user or the daemon chose (names,
failure reasons, log tails, messages, error texts, and log bytes on a
terminal) is printed through ``flowd.textsafe``: control characters other
than newline and tab show as escapes. ``logs`` into a pipe or file is
byte-exact, and ``--json`` is JSON (json.dumps escapes every control
character).
"""
from __future__ import annotations

import argparse
import codecs
import functools
import json
import math
import os
import signal
import sys
import time

from flowd import units
from flowd.errors import FlowError, NotFound, UsageError, WorkflowError
from flowd.textsafe import for_terminal as _t

from . import fmt
from .client import Client, DaemonStopped, LocalFileError, NotRunning, check_out_dir

FINAL = ("succeeded", "failed", "cancelled")
MAX_TIMEOUT = 86400.0  # --timeout: at most a day


def _timeout(text: str) -> float:
    """``--timeout``: seconds, more than 0 and at most a day (not inf, not nan)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(
            f"{_t(text)!r} is not a number of seconds more than 0 and at most {MAX_TIMEOUT:g} "
            "(fix: e.g. --timeout 30)")
    return value


def _memory(text: str) -> int:
    """``resize --memory``: a size as a workflow writes it (``256m``, ``1g``) or bytes."""
    from flowd.units import parse_size

    try:
        return parse_size(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{_t(text)!r} is not a size (fix: e.g. --memory 256m, 1g or 268435456)") from None


def _cpus(text: str) -> float:
    """``resize --cpus``: a number of CPUs more than 0 (the daemon bounds it too)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"{_t(text)!r} is not a number of CPUs more than 0 (fix: e.g. --cpus 0.5 or 2)")
    return value


# Commands whose code (and parser) is in a module of its own, imported when used.
TRACE_COMMANDS = ("trace", "report")  # flowctl/tracecmd.py
CACHE_COMMANDS = ("why", "cache")  # flowctl/cachecmd.py


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """flowctl's parser; with ``only``, the subparser of that command alone
    (``main`` knows the command from argv: each ``add_argument`` costs, and
    ``status`` must answer fast)."""
    ap = argparse.ArgumentParser(prog="flowctl", description="Control the flowd workflow daemon.")
    ap.add_argument("--socket", help="control socket (default: $FLOWD_SOCKET or /run/flowd/flowd.sock)")
    ap.add_argument("--timeout", type=_timeout, default=10.0,
                    help="seconds to wait for each answer from flowd (default 10)")
    # the same two options are also accepted after the command (flowctl status --socket S)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=_timeout, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add = functools.partial(sub.add_parser, parents=[common])
    if only is not None:
        add = functools.partial(_add_only, add, only)

    p = add("submit", help="validate a workflow, send it with its files, print the run id")
    p.add_argument("file")
    p.add_argument("--wait", action="store_true", help="follow the run to its end; exit 1 if it fails")
    p.add_argument("--json", action="store_true")

    p = add("status", help="all runs, or one run in detail")
    p.add_argument("run", nargs="?")
    p.add_argument("--json", action="store_true")

    p = add("cancel", help="stop runs' containers; their data is kept")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--json", action="store_true")

    p = add("resize", help="new memory or cpu limits for a process of a running run (later "
                           "tasks, and live for its running containers)")
    p.add_argument("run")
    p.add_argument("process")
    p.add_argument("--memory", type=_memory, metavar="SIZE", help="e.g. 256m or 1g")
    p.add_argument("--cpus", type=_cpus, metavar="N", help="e.g. 0.5 or 2")
    p.add_argument("--json", action="store_true")

    p = add("rm", help="delete finished runs: their items, logs and dead letters")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--force", action="store_true",
                   help="also an active run: cancel it, then delete it once its tasks stopped")
    p.add_argument("--json", action="store_true")

    p = add("retry", help="put a run's failed tasks' inputs back in their channels; the run goes on")
    p.add_argument("run")
    p.add_argument("--process", metavar="P", help="only the failed tasks of this process")
    p.add_argument("--wait", action="store_true", help="follow the run to its end; exit 1 if it fails")
    p.add_argument("--json", action="store_true")

    p = add("watch", help="follow a run's progress until it ends; exit 1 if it fails")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")

    p = add("events", help="the daemon's live events, one a line (with RUN: until the run ends)")
    p.add_argument("run", nargs="?")
    p.add_argument("--json", action="store_true", help="one JSON object a line")

    p = add("metrics", help="the daemon's metrics in the Prometheus text format")

    p = add("validate", help="check a workflow file without a daemon")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")

    p = add("push", help="append an item to a channel of a running run")
    p.add_argument("run")
    p.add_argument("channel")
    p.add_argument("file", nargs="?", default="-", help="the item's bytes (default -: stdin)")
    p.add_argument("--json", action="store_true")

    p = add("logs", help="task logs (stdout and stderr of each attempt)")
    p.add_argument("run")
    p.add_argument("process", nargs="?")
    p.add_argument("--task", help="only this task (its id, as in the container name)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing logs as tasks write them, until the run ends")
    p.add_argument("--json", action="store_true")

    p = add("graph", help="the workflow as a Graphviz DOT graph (live depths for a run)")
    p.add_argument("target", metavar="FILE.xml|RUN")

    p = add("pull", help="write a channel's items out as files (they stay in the channel)")
    p.add_argument("run")
    p.add_argument("channel")
    p.add_argument("--out", default=".", help="folder to write to (default: here)")
    p.add_argument("--json", action="store_true")
    if only is None or only in TRACE_COMMANDS:
        from . import tracecmd

        tracecmd.add_parsers(add)  # trace, report
    if only is None or only in CACHE_COMMANDS:
        from . import cachecmd

        cachecmd.add_parsers(add)  # why, cache
    return ap


class _Skipped:
    """The parser of a command ``build_parser(only=...)`` leaves out: takes
    every call and keeps nothing."""

    def __getattr__(self, name):
        return lambda *a, **kw: self


def _add_only(add, only: str, name: str, **kw):
    return add(name, **kw) if name == only else _Skipped()


GLOBAL_VALUED = ("--socket", "--timeout")  # the options before the command that take a value


def command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names, when it is plain: only ``--socket``/``--timeout``
    (or unique prefixes of them, as argparse allows) before a known command.
    None for anything else (``-h``, ``--``, an unknown word): the whole parser
    then parses it, and its usage and errors name every command."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("-"):
            return a if a in COMMANDS else None
        opt = a.split("=", 1)[0]
        hits = [o for o in GLOBAL_VALUED if len(opt) > 2 and o.startswith(opt)]
        if len(hits) != 1:
            return None
        i += 1 if "=" in a else 2
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(argv)).parse_args(argv)
    client = Client(args.socket, args.timeout)
    try:
        return COMMANDS[args.command](client, args)
    except WorkflowError as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": e.to_dict()}, indent=1))
        else:
            for p in e.problems:
                print(_t(p), file=sys.stderr)
        return e.exit_status
    except FlowError as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": e.to_dict()}, indent=1))
        print(f"flowctl: {_t(e)}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("flowctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        client.close()


def _load(path: str):
    # The parser says what is wrong with the path itself (missing, a folder,
    # not a regular file) in the documented FILE: error: ... (fix: ...) form.
    from flowd.parser import load_workflow  # lxml: only for the commands that parse

    return load_workflow(path)


def cmd_validate(client: Client, args) -> int:
    wf, warnings = _load(args.file)
    if args.json:
        print(json.dumps({"ok": True, "workflow": wf.name, "mode": wf.mode,
                          "processes": list(wf.processes), "channels": list(wf.channels),
                          "warnings": [w.to_dict() for w in warnings]}, indent=1))
    else:
        for w in warnings:
            print(_t(w), file=sys.stderr)
        print(_t(f"{args.file}: valid: workflow {wf.name!r}, {len(wf.processes)} processes, "
                 f"{len(wf.channels)} channels, {len(wf.muxes)} muxes"))
    return 0


SUBMIT_TIMEOUT = 600.0  # seconds for the daemon to write a submitted run's items


def cmd_submit(client: Client, args) -> int:
    client.pending = None
    name = os.path.basename(args.file)
    try:
        wf, warnings = _load(args.file)
        name = wf.name
        for w in warnings:
            print(_t(w), file=sys.stderr)
        base = os.path.dirname(os.path.abspath(args.file))
        files = [("workflow.xml", args.file)] + [(rel, os.path.join(base, rel))
                                                 for rel in wf.files()]
        request = {"name": os.path.basename(args.file)}
        request["upload"] = client.upload(files)
        client.send_patiently("submit", request)
        # The daemon answers once the run's items are all on disk: seconds for
        # tens of thousands (it serves other requests meanwhile), so wait longer.
        result = client.await_patiently("submit", max(client.timeout, SUBMIT_TIMEOUT))
    except KeyboardInterrupt:
        return _submit_interrupted(client, args, name)
    run = result["run"]
    if not args.wait:
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print(_t(run))
        return 0
    if not args.json:
        print(_t(f"{run}: submitted workflow {result['name']!r}"), file=sys.stderr)
    return _follow(client, run, args.json)


def _submit_interrupted(client: Client, args, name: str) -> int:
    """Ctrl-C during submit. Before the submit request left, nothing was made.
    After, the daemon goes on making the run: wait for its id (as patiently as
    before) so the user knows what exists; a second Ctrl-C stops waiting and
    says the run may still appear. Ctrl-C stops flowctl, never a run:
    ``flowctl cancel`` does that."""
    if client.pending is None:
        print("flowctl: interrupted before the workflow was submitted: no run was made",
              file=sys.stderr)
        return 130
    may_exist = _t(f"flowctl: the run of workflow {name!r} may still be made: `flowctl status` "
                   "lists it once it is, and `flowctl cancel RUN` stops it")
    try:  # one write, inside the try: a second Ctrl-C may come at once
        sys.stderr.write("flowctl: interrupted after the workflow was sent: flowd goes on making "
                         "the run; waiting for its id (Ctrl-C again to stop waiting)\n")
        sys.stderr.flush()
        result = client.await_patiently("submit", max(client.timeout, SUBMIT_TIMEOUT))
    except KeyboardInterrupt:
        print(may_exist, file=sys.stderr)
        return 130
    except FlowError as e:
        print(f"flowctl: {_t(e)}", file=sys.stderr)
        print(may_exist, file=sys.stderr)
        return 130
    run = result["run"]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(_t(run))
    print(_t(f"flowctl: run {run} was made and goes on; `flowctl cancel {run}` stops it"),
          file=sys.stderr)
    return 130


def _call_riding(client: Client, run: str, cmd: str, args: dict, timeout: float) -> dict:
    """A request that is safe to repeat (``status``), through a daemon stop or
    restart: when the daemon goes away, say so at once and wait up to
    ``--timeout`` for it to come back; exit 3 (not running) if it does not."""
    while True:
        try:
            return client.call(cmd, args, timeout=timeout)[0]
        except (DaemonStopped, NotRunning) as e:
            if not client.reached:
                raise  # not running from the start: nothing to wait for
            stopped = e
        print(_t(f"flowctl: flowd stopped while following run {run} ({stopped}); waiting up to "
                 f"{client.timeout:g}s for it to come back"), file=sys.stderr)
        try:
            client.reconnect(client.timeout)
        except NotRunning as e:
            raise NotRunning(f"{e}; the run is kept: `flowctl watch {run}` follows it again "
                             "once flowd runs") from None
        print("flowctl: flowd is back; following the run again", file=sys.stderr)


def _wait(client: Client, run: str, quiet: bool) -> dict:
    last = None
    wait = 0  # the state now, then long-polls: the daemon answers when the run ends, or in 30 s
    while True:
        result = _call_riding(client, run, "status", {"run": run, "wait": wait},
                              timeout=client.timeout + wait)
        wait = 30
        detail = result["run"]
        if detail is None:
            raise NotFound(f"run {run} is gone (removed while it was followed)")
        line = f"{run}: {detail['state']}, {detail['tasks_done']} tasks done, " \
               f"{detail['tasks_running']} running, {detail['tasks_failed']} failed"
        if not quiet and line != last:
            print(_t(line), file=sys.stderr)
            last = line
        if detail["state"] in FINAL:
            return detail


def _watch(client: Client, run: str, quiet: bool) -> dict | None:
    """Follow the run on the event stream (flowctl/live.py) to its end; Ctrl-C
    stops watching (None), not the run."""
    from . import live

    try:
        return live.watch(client, functools.partial(_riding, client, run), run, quiet)
    except KeyboardInterrupt:
        print(_t(f"flowctl: stopped watching; run {run} goes on (`flowctl watch {run}` follows "
                 f"it again, `flowctl cancel {run}` stops it)"), file=sys.stderr)
        return None


def _riding(client: Client, run: str, cmd: str, args: dict, timeout: float) -> dict:
    return _call_riding(client, run, cmd, args, timeout)


def cmd_events(client: Client, args) -> int:
    from . import live

    return live.events(client, lambda cmd, a, timeout: client.call(cmd, a, timeout=timeout)[0],
                       args.run, args.json)


def cmd_metrics(client: Client, args) -> int:
    result, _ = client.call("metrics")
    sys.stdout.write(result["text"])
    return 0


def _follow(client: Client, run: str, as_json: bool) -> int:
    """Follow ``run`` to its end and print it (watch, submit --wait, retry --wait):
    0 if it succeeded, 1 if not, 130 on Ctrl-C (the run goes on)."""
    detail = _watch(client, run, quiet=as_json)
    if detail is None:
        return 130
    print(json.dumps(detail, indent=1) if as_json else _render_run(detail))
    return 0 if detail["state"] == "succeeded" else 1


def cmd_watch(client: Client, args) -> int:
    return _follow(client, args.run, args.json)


def cmd_status(client: Client, args) -> int:
    if args.run:
        result = client.call_once("status", {"run": args.run})  # no ZeroMQ: a faster start
        if args.json:
            print(json.dumps(result["run"], indent=1))
        else:
            print(_render_run(result["run"]))
            if not result.get("engine_up", True):
                print("\nwarning: the Docker engine is unavailable; tasks wait for it")
            if not result.get("disk_ok", True):
                print("\nwarning: the spool is below its free-space floor; the run is paused")
        return 0
    result = client.call_once("status")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    rows = [[_t(r["id"]), _t(r["name"]), _t(r["state"]), _t(r.get("owner", "?")), r["tasks_done"],
             r["tasks_running"], r["tasks_failed"], fmt.ago(r["submitted_at"]),
             fmt.duration(r["elapsed"])]
            for r in result["runs"]]
    if rows:
        print(fmt.table(["RUN", "WORKFLOW", "STATE", "OWNER", "DONE", "RUNNING", "FAILED",
                         "SUBMITTED", "ELAPSED"], rows))
    else:
        print("no runs")
    pool = result.get("containers") or {}
    nodes = pool.get("nodes")
    if isinstance(nodes, list) and nodes:
        print("\n" + _render_nodes(nodes))
    if pool.get("message"):
        print(f"\nwarning: {_t(pool['message'])}")
    if isinstance(pool.get("warm"), dict) and (pool["warm"].get("containers") or pool.get("fresh")):
        warm = pool["warm"]
        print(f"\ncontainers: {_n(pool.get('fresh'))} fresh, {_n(warm.get('containers'))} warm "
              f"({_n(warm.get('busy'))} busy, {_n(warm.get('idle'))} idle), "
              f"at most {_n(pool.get('max_containers'))}")
    if not result.get("engine_up", True):
        print(f"\nwarning: the Docker engine is unavailable ({_t(result.get('engine_message'))}); "
              "tasks wait for it")
    if not result.get("disk_ok", True):
        print(f"\nwarning: the spool is below its free-space floor ({fmt.size(result['disk_free'])} "
              "free): runs are paused and submissions refused until space is freed")
    return 0


def _render_nodes(nodes: list) -> str:
    """The cluster's nodes (executor swarm): state, the spool check, tasks on each."""
    nodes = [n for n in nodes if isinstance(n, dict)]
    rows = [[_t(n.get("name")), _t(n.get("id")), _t(n.get("role")), _t(n.get("state")),
             _t(n.get("availability")), _t(n.get("spool")), _n(n.get("tasks"))] for n in nodes]
    out = [fmt.table(["NODE", "ID", "ROLE", "STATE", "AVAILABILITY", "SPOOL", "TASKS"], rows)]
    for n in nodes:
        if n.get("why"):
            out.append(_t(f"node {n.get('name')} ({n.get('id')}): {n.get('why')}"))
    return "\n".join(out)


def _n(v) -> int:
    """A count from the daemon, as a number whatever it sent."""
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _render_run(d: dict) -> str:
    """The run's view; every string from the daemon passes ``_t`` (a name,
    reason, message or log line may hold what a container chose)."""
    out = [
        f"run       {_t(d['id'])}",
        f"workflow  {_t(d['name'])} ({_t(d['mode'])})",
        f"state     {_t(d['state'])}" + (f": {_t(d['message'])}" if d.get("message") else ""),
        f"owner     {_t(d.get('owner', '?'))}",
        f"submitted {fmt.when(d['submitted_at'])}",
        f"elapsed   {fmt.duration(d['elapsed'])}",
        "",
        fmt.table(["PROCESS", "DONE", "RUNNING", "QUEUED", "FAILED"],
                  [[_t(p["name"]), p["done"], p["running"], p["queued"], p["failed"]]
                   for p in d["processes"]]),
        "",
        fmt.table(["CHANNEL", "DEPTH", ""],
                  [[_t(c["name"]), c["depth"], "result" if c["result"] else ""]
                   for c in d["channels"]]),
    ]
    running = [t for t in d.get("running") or [] if isinstance(t, dict)]
    if running:
        nodes = any(t.get("node") for t in running)
        rows = [[_t(t.get("task")), _t(t.get("process")), _n(t.get("attempt")), fmt.ago(t.get("started_at"))]
                + ([_t(t.get("node") or "-")] if nodes else []) for t in running]
        out += ["", fmt.table(["TASK", "PROCESS", "ATTEMPT", "STARTED"] + (["NODE"] if nodes else []), rows)]
        if _n(d.get("running_more")):
            out.append(f"... and {_n(d.get('running_more'))} more running")
    for q in d.get("quarantined", []):
        out += ["", _t(f"quarantined: item {q['seq']} of channel {q['channel']} "
                       f"(for {q['process']}): {q['reason']}; kept in "
                       f"SPOOL/runs/{d['id']}/quarantine/")]
    for f in d.get("failures", []):
        out += ["", _t(f"failed: {f['process']} task {f['task']} after {f['attempts']} "
                       f"attempt(s): {f['reason']}")]
        tail = (f.get("log_tail") or "").rstrip("\n").splitlines()[-10:]
        out += [f"  | {_t(line)}" for line in tail]
    return "\n".join(out)


def cmd_cancel(client: Client, args) -> int:
    result, _ = client.call("cancel", {"runs": args.runs})
    for r in result["runs"]:  # like `docker stop`: return once the containers are stopped
        if r["ok"] and r["state"] not in FINAL:
            r["state"] = _wait(client, r["id"], quiet=True)["state"]
    if args.json:
        print(json.dumps(result, indent=1))
    status = 0
    for r in result["runs"]:
        if not r["ok"]:
            status = 1
        if not args.json:
            print(_t(f"{r['id']}: {r['state']}" + ("" if r["ok"] else f" ({r['message']})")))
    return status


def cmd_rm(client: Client, args) -> int:
    result, _ = client.call("rm", {"runs": args.runs, "force": int(args.force)})
    for r in result["runs"]:  # --force: return once the cancelled run is deleted
        if not r["removed"]:
            try:
                _wait_gone(client, r["id"])
                r["removed"] = True
            except KeyboardInterrupt:
                print(_t(f"flowctl: stopped waiting; run {r['id']} is cancelled and is deleted "
                         "once its tasks stop"), file=sys.stderr)
                return 130
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for r in result["runs"]:
            print(_t(f"{r['id']}: deleted"))
    return 0


def _wait_gone(client: Client, run: str) -> None:
    """Until the daemon no longer knows ``run`` (a status waiter is answered when it goes)."""
    while True:
        try:
            result, _ = client.call("status", {"run": run, "wait": 30}, timeout=client.timeout + 30)
        except NotFound:
            return
        if result["run"] is None:
            return
        if result["run"]["state"] in FINAL:
            time.sleep(0.25)  # ended: deleted within a turn of the daemon's loop


def cmd_retry(client: Client, args) -> int:
    result, _ = client.call("retry", {"run": args.run, "process": args.process})
    run = result["run"]
    if not args.wait:
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print(_t(f"{run}: {result['retried']} failed task(s) retried; the run is "
                     f"{result['state']}"))
        return 0
    if not args.json:
        print(_t(f"{run}: {result['retried']} failed task(s) retried"), file=sys.stderr)
    return _follow(client, run, args.json)


RESIZE_TIMEOUT = 300.0  # seconds for the daemon to read and change the running containers


def cmd_resize(client: Client, args) -> int:
    if args.memory is None and args.cpus is None:
        raise UsageError("resize: nothing to change (fix: give --memory SIZE, --cpus N or both)")
    request = {"run": args.run, "process": args.process, "memory": args.memory, "cpus": args.cpus}
    result = client.call_patiently("resize", request, max(client.timeout, RESIZE_TIMEOUT))
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    memory = "no limit" if result.get("memory") is None else units.size(result["memory"], trim=True)
    cpus = "no limit" if result.get("cpus") is None else f"{result['cpus']:g}"
    print(_t(f"{result['run']}: process {result['process']} resized: memory {memory}, cpus {cpus}; "
             f"{_n(result.get('updated'))} running container(s) given them live, "
             f"{_n(result.get('retired'))} warm container(s) replaced, {_n(result.get('kept'))} "
             "task(s) keep their old limits; later tasks get the new ones"))
    if result.get("note"):
        print(_t(f"note: {result['note']}"))
    return 0


def cmd_pull(client: Client, args) -> int:
    out = check_out_dir(args.out)
    written = []
    run = args.run
    # A SIGTERM or SIGHUP (a closed terminal) stops the pull as Ctrl-C does: an item
    # being written is removed, never left half there.
    before = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for item, dest in client.pull(args.run, args.channel, out):
            run = item["run"]
            written.append({"file": dest, "size": item["size"], "seq": item["seq"]})
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if not written:  # the run and channel were still checked by the daemon
        run = client.call("items", {"run": args.run, "channel": args.channel})[0]["run"]
    if args.json:
        print(json.dumps({"run": run, "channel": args.channel, "files": written}, indent=1))
    else:
        for w in written:
            print(_t(w["file"]))
        print(_t(f"{len(written)} items from {args.channel} written to {out}"), file=sys.stderr)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_push(client: Client, args) -> int:
    if args.file == "-":
        src = sys.stdin.buffer
    else:
        try:
            src = open(args.file, "rb")
        except OSError as e:
            raise LocalFileError(f"{args.file}: cannot read it: {e.strerror} "
                                 "(fix: check the path)") from None
    with src:
        result = client.push(args.run, args.channel, src)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(result["seq"])
    return 0


class _TerminalLog:
    """Log bytes for a terminal: escaped as ``bytes_for_terminal`` does, but
    chunk by chunk, one incremental UTF-8 decoder per log, so a character
    split across two chunks (or two reads of a growing log) stays whole."""

    def __init__(self, out):
        self.out = out  # a binary stream (sys.stdout.buffer)
        self.encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        self.decoders: dict[str, codecs.IncrementalDecoder] = {}
        self.name = ""

    def write(self, data: bytes) -> int:
        decoder = self.decoders.get(self.name)
        if decoder is None:
            decoder = self.decoders[self.name] = \
                codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._emit(decoder.decode(data))
        return len(data)

    def finish(self) -> None:
        """At the end: bytes still held (a character cut short) show as \\xNN."""
        for decoder in self.decoders.values():
            self._emit(decoder.decode(b"", final=True))

    def _emit(self, text: str) -> None:
        if text:
            self.out.write(_t(text).encode(self.encoding, "backslashreplace"))


def cmd_logs(client: Client, args) -> int:
    seen: dict[str, int] = {}  # log name -> bytes printed
    printed_json = []
    last = None  # the log whose bytes were printed last (as tail -f, a header on each switch)
    # Into a pipe or a file the bytes are exact; on a terminal they are escaped.
    sink = _TerminalLog(sys.stdout.buffer) if sys.stdout.isatty() else sys.stdout.buffer
    offset = 0  # where the next page of the run's trace starts (only new attempts are asked for)
    try:
        while True:
            result, _ = client.call("logs", {"run": args.run, "process": args.process,
                                             "task": args.task, "follow": int(bool(args.follow)),
                                             "offset": offset})
            offset = result.get("next", offset)  # (a flowd without pages: every log at once)
            for entry in result["logs"]:
                name = entry["name"]
                done = seen.get(name, 0)
                if entry["size"] <= done and name in seen:
                    continue
                if args.json:
                    if name not in seen:
                        printed_json.append(entry)
                    seen[name] = entry["size"]
                    continue
                if name != last:
                    sys.stdout.flush()
                    print(_t(f"==> {entry['process']} task {entry['task']} attempt "
                             f"{entry['attempt']} <=="), flush=True)
                last = name
                if isinstance(sink, _TerminalLog):
                    sink.name = name
                seen[name] = done + client.copy_log(result["run"], name, done, sink)
                sys.stdout.flush()
            if result.get("more"):
                continue  # the next page at once
            if args.json or not args.follow or result["state"] in FINAL:
                break
            # A long-poll: the daemon answers when the run changes, or after a
            # second for the logs of running tasks to grow.
            client.call("status", {"run": result["run"], "wait": 1}, timeout=client.timeout + 1)
    finally:
        if isinstance(sink, _TerminalLog):
            sink.finish()
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"run": result["run"], "logs": printed_json}, indent=1))
    elif not seen:
        print(_t(f"no logs yet for run {result['run']}"), file=sys.stderr)
    return 0


def cmd_graph(client: Client, args) -> int:
    from flowd.dot import to_dot
    from flowd.model import Workflow

    if args.target.endswith(".xml") or os.path.isfile(args.target):
        wf, _ = _load(args.target)
        print(to_dot(wf), end="")
        return 0
    result, _ = client.call("graph", {"run": args.target})
    wf = Workflow.from_dict(result["workflow"])
    print(to_dot(wf, result["depths"], title=f"{result['run']} ({result['state']})"), end="")
    return 0


def cmd_trace(client: Client, args) -> int:
    from . import tracecmd

    return tracecmd.COMMANDS[args.command](client, args)


def cmd_cache(client: Client, args) -> int:
    from . import cachecmd

    return cachecmd.COMMANDS[args.command](client, args)


COMMANDS = {
    "submit": cmd_submit,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "watch": cmd_watch,
    "validate": cmd_validate,
    "pull": cmd_pull,
    "push": cmd_push,
    "logs": cmd_logs,
    "graph": cmd_graph,
    "resize": cmd_resize,
    **{name: cmd_trace for name in TRACE_COMMANDS},
    **{name: cmd_cache for name in CACHE_COMMANDS},
    "rm": cmd_rm,
    "retry": cmd_retry,
    "events": cmd_events,
    "metrics": cmd_metrics,
}


if __name__ == "__main__":
    sys.exit(main())
