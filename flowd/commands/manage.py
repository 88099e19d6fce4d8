"""Commands that delete or continue runs: rm (flowd/removal.py) and retry (flowd/retrying.py)."""
from __future__ import annotations

from .. import owners, retrying
from .runs import find_run


def _caller(args) -> str:
    return args["_caller"].user


def rm(d, args, payload, **kw):
    runs = []
    for ref in args["runs"]:  # every name checked before anything changes
        run = find_run(d, ref)
        if run not in runs:
            runs.append(run)
    # and who may: one refused run refuses them all, before any is deleted
    owners.check_all(runs, args["_caller"], d.cfg.admin_group, "delete")
    return {"runs": d.removal.rm(runs, bool(args["force"]), _caller(args))}


def retry(d, args, payload, **kw):
    run = find_run(d, args["run"])
    owners.check(run, args["_caller"], d.cfg.admin_group, "retry")
    return retrying.retry(run, args["process"])
