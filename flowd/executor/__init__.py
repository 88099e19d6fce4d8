"""Executors: where task attempts run (see ``base``).

This package imports no third-party module: ``flowd.executor.docker`` (it
and its ``dockerapi`` and ``dockerspec`` are the only modules that import the
docker SDK) is imported by whoever needs it, so that ``flowctl`` and the
engine's tests never load docker.
"""
from .base import (
    DAMAGED,
    ERROR,
    EXITED,
    KILLED,
    MISSING,
    OOM,
    TIMEOUT,
    EngineState,
    Executor,
    Mount,
    TaskResult,
    TaskSpec,
    check_inputs,
    live_log_path,
)

__all__ = [
    "DAMAGED", "ERROR", "EXITED", "KILLED", "MISSING", "OOM", "TIMEOUT",
    "EngineState", "Executor", "Mount", "TaskResult", "TaskSpec",
    "check_inputs", "live_log_path",
]
