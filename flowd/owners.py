"""Who may change a run (docs/operations.md, "Who may change a run").

Every run records who submitted it in its run.json: ``submitted_uid`` (the
peer's uid on the socket, from SO_PEERCRED; for a spool drop, the uid owning
the dropped file) and ``submitted_by`` (that user's name then). ``cancel``,
``push``, ``resize``, ``retry`` and ``rm`` are allowed to that
uid, to root and to the members of the config's ``admin_group``; anyone
else is refused, exit 1, with a message naming the owner. A run made by an
older flowd, which did not record the uid, may be changed by root and the
admins only. ``check`` decides, and logs each allowed or refused change
with the caller's name; the groups are read (grp/pwd) when it is asked.
"""
from __future__ import annotations

import grp
import logging
import pwd

from .errors import FlowError
from .textsafe import for_log

log = logging.getLogger("flowd")


def owner_uid(meta: dict) -> int | None:
    """The uid that submitted the run, or None (a run of an older flowd)."""
    uid = meta.get("submitted_uid")
    return uid if isinstance(uid, int) and not isinstance(uid, bool) and uid >= 0 else None


def user_name(uid: int) -> str:
    """``uid``'s user name, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def owner_name(meta: dict) -> str:
    """The run's owner as a user sees it: the recorded uid's user name (its
    number if it has none), or the name recorded by an older flowd, or "?"."""
    uid = owner_uid(meta)
    if uid is not None:
        return user_name(uid)
    return str(meta.get("submitted_by") or "?")


def in_group(uid: int, group: str) -> bool:
    """Whether ``uid`` is a member of ``group``, by its primary group or a
    supplementary one (the group's member list), read now."""
    if not group:
        return False
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return False  # no name: in no member list, and no primary group to compare
    return pw.pw_gid == g.gr_gid or pw.pw_name in g.gr_mem


def may_change(caller_uid: int | None, meta: dict, admin_group: str) -> bool:
    """Whether ``caller_uid`` may change the run whose run.json is ``meta``."""
    if caller_uid is None:
        return False  # the kernel did not say who it is
    if caller_uid == 0:
        return True
    if owner_uid(meta) == caller_uid:
        return True
    return in_group(caller_uid, admin_group)


def check(run, caller, admin_group: str, action: str) -> None:
    """Refuse (FlowError, exit 1) unless ``caller`` (control.Caller) may
    ``action`` run ``run``; log the change either way, with the caller's name."""
    check_all([run], caller, admin_group, action)


def check_all(runs: list, caller, admin_group: str, action: str) -> None:
    """``check`` for several runs at once: one refused refuses them all, and
    the allowed ones are logged only when none is refused."""
    uid = getattr(caller, "uid", None)
    who = f"{for_log(user_name(uid))} (uid {uid})" if uid is not None else "an unknown caller"
    for run in runs:
        if may_change(uid, run.meta, admin_group):
            continue
        owner = owner_name(run.meta)
        log.warning("run %s: %s by %s refused: the run belongs to %s", run.id, action, who,
                    for_log(owner))
        if owner_uid(run.meta) is None:
            raise FlowError(f"run {run.id} belongs to {owner}, and was made by an older flowd "
                            "that did not record its owner's uid: only root and members of the "
                            f"config's admin_group may {action} it (fix: ask an admin)")
        raise FlowError(f"run {run.id} belongs to {owner} (fix: ask {owner}, or an admin: root or "
                        "a member of the config's admin_group)")
    for run in runs:
        log.info("run %s: %s by %s allowed (owner %s)", run.id, action, who,
                 for_log(owner_name(run.meta)))
