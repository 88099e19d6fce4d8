"""The exception tree shared by flowd and flowctl (stdlib only).

Every error a user can see carries a stable ``code`` that the control
protocol sends to flowctl, and a message written for a person::

    FlowError                      code
    ├── UsageError                 usage            bad arguments      (exit 2)
    ├── WorkflowError              invalid          bad workflow file  (exit 2)
    ├── NotFound                   not_found        no such run/channel/task
    ├── Ambiguous                  ambiguous        run prefix matches several
    ├── Conflict                   conflict         wrong state for the request
    ├── ProtocolError              protocol         malformed or oversized message
    ├── StorageError               storage          spool I/O failed
    │   └── DiskFull               disk_full        spool is below its free-space floor
    ├── EngineError                engine           Docker failed
    │   ├── EngineUnavailable      engine_down      the Docker engine is not reachable
    │   └── ImageUnavailable       image            image missing and not pullable
    ├── AlreadyRunning             already_running  another flowd holds the spool/socket
    ├── DaemonUnreachable          unreachable      flowctl could not reach flowd (exit 3)
    └── InternalError              internal         a bug in flowd (logged there, no traceback sent)

A container that exits non-zero is a task *result*, never an exception.
"""
from __future__ import annotations



class FlowError(Exception):
    code = "error"
    exit_status = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class UsageError(FlowError):
    code = "usage"
    exit_status = 2


class Problem:
    """One finding in a workflow file: where it is and how to fix it.

    A plain class, not a dataclass: flowctl imports this module on every
    command, and dataclasses (with inspect) would add a fifth to its start-up."""

    __slots__ = ("file", "line", "element", "message", "fix", "severity")

    def __init__(self, file: str, line: int | None, element: str | None, message: str,
                 fix: str | None = None, severity: str = "error"):  # severity: or "warning"
        self.file, self.line, self.element = file, line, element
        self.message, self.fix, self.severity = message, fix, severity

    def __eq__(self, other) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # as a dataclass with eq: mutable, unhashable

    def __repr__(self) -> str:
        return "Problem(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"<{self.element}>: " if self.element else ""
        text = f"{where}: {self.severity}: {what}{self.message}"
        if self.fix:
            text += f" (fix: {self.fix})"
        return text

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "element": self.element,
            "message": self.message,
            "fix": self.fix,
            "severity": self.severity,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(
            file=str(d.get("file", "?")),
            line=d.get("line"),
            element=d.get("element"),
            message=str(d.get("message", "")),
            fix=d.get("fix"),
            severity=str(d.get("severity", "error")),
        )


class WorkflowError(FlowError):
    """A workflow file was rejected; ``problems`` lists every finding."""

    code = "invalid"
    exit_status = 2

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["problems"] = [p.to_dict() for p in self.problems]
        return d


class NotFound(FlowError):
    code = "not_found"


class Ambiguous(FlowError):
    code = "ambiguous"
    exit_status = 2


class Conflict(FlowError):
    code = "conflict"


class ProtocolError(FlowError):
    code = "protocol"


class StorageError(FlowError):
    code = "storage"


class DiskFull(StorageError):
    code = "disk_full"


class EngineError(FlowError):
    code = "engine"


class EngineUnavailable(EngineError):
    code = "engine_down"


class ImageUnavailable(EngineError):
    code = "image"


class AlreadyRunning(FlowError):
    code = "already_running"


class DaemonUnreachable(FlowError):
    code = "unreachable"
    exit_status = 3


class InternalError(FlowError):
    """A bug in flowd: what the client is told instead of a traceback."""

    code = "internal"

    def __init__(self, message: str = "internal error in flowd; see its log (journalctl -u flowd)"):
        super().__init__(message)


_BY_CODE = {
    cls.code: cls
    for cls in (
        FlowError, UsageError, NotFound, Ambiguous, Conflict, ProtocolError,
        StorageError, DiskFull, EngineError, EngineUnavailable,
        ImageUnavailable, AlreadyRunning, DaemonUnreachable, InternalError,
    )
}


def error_from_dict(d: dict) -> FlowError:
    """Rebuild an error sent over the protocol (client side)."""
    code = d.get("code", "error")
    if code == WorkflowError.code:
        return WorkflowError([Problem.from_dict(p) for p in d.get("problems", [])])
    cls = _BY_CODE.get(code, FlowError)
    err = cls(str(d.get("message", "unknown error")))
    if cls is FlowError:
        err.code = code
    return err

