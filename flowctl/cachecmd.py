"""``flowctl why`` and ``flowctl cache``: the content cache of process@cache="yes"
(flowd/cache.py). Every string from the daemon is escaped for the terminal:
a task id or a process name may be a user's, a reason may quote an engine."""
from __future__ import annotations

import json
import sys

from flowd.textsafe import for_terminal as _t

from . import fmt


def add_parsers(add) -> None:
    """The subcommands' arguments (``add``: flowctl's ``add_parser``)."""
    p = add("why", help="why a task of a process with cache=\"yes\" ran (what differed from the "
                        "nearest earlier task), or which task its cached outputs came from")
    p.add_argument("run")
    p.add_argument("task", help="the task's id, as `flowctl trace RUN` shows it")
    p.add_argument("--json", action="store_true")

    p = add("cache", help="the content cache: list its entries, or remove some")
    sub = p.add_subparsers(dest="cache_command", metavar="ls|rm", required=True)
    q = sub.add_parser("ls", help="entries, size and last use per process")
    q.add_argument("--json", action="store_true")
    q = sub.add_parser("rm", help="remove entries (never a run's items): one process's, or all")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--process", metavar="P", help="a process name, or WORKFLOW/PROCESS")
    what.add_argument("--all", action="store_true", help="every entry")
    q.add_argument("--json", action="store_true")


def cmd_why(client, args) -> int:
    result, _ = client.call("why", {"run": args.run, "task": args.task})
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    diffs = result.get("differences") or []
    head = result.get("message", "")
    if len(diffs) > 1 and result.get("compared_with"):
        src = result["compared_with"]
        head = (f"task {result['task']} ran; compared with run {src.get('run')} task "
                f"{src.get('task')}, these differ:")
        print(_t(head))
        for d in diffs:
            print(_t(f"  - {d}"))
    else:
        print(_t(head))
    return 0


def cmd_cache(client, args) -> int:
    if args.cache_command == "ls":
        result, _ = client.call("cache_ls", {})
        if args.json:
            print(json.dumps(result, indent=1))
            return 0
        rows = [[_t(r["process"]), r["entries"], fmt.size(r["size"]), fmt.when(r["last_used"])]
                for r in result["processes"]]
        if rows:
            print(fmt.table(["PROCESS", "ENTRIES", "SIZE", "LAST USED"], rows))
        bound = "no bound" if result.get("max_size") is None else f"at most {fmt.size(result['max_size'])}"
        print(f"{result['entries']} entries, {fmt.size(result['size'])} ({bound}); since flowd started: "
              f"{result['hits']} hits, {result['misses']} misses, {result['evicted']} evicted")
        return 0
    args_out = {"all": int(args.all)}
    if args.process:
        args_out["process"] = args.process
    result, _ = client.call("cache_rm", args_out)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    mine = " (of your own runs: only root and the admin_group remove others')" if result["own_only"] else ""
    print(f"removed {result['removed']} cache entries, {fmt.size(result['size'])}{mine}",
          file=sys.stdout)
    return 0


COMMANDS = {"why": cmd_why, "cache": cmd_cache}
