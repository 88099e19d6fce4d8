"""Small builders shared by the unit tests (no Docker)."""
from __future__ import annotations

from flowd.model import Channel, InitialItem, Mux, Port, Process, Workflow


def wf(*, channels: dict[str, list[str]] | None = None, processes: list[Process] | None = None,
       muxes: list[tuple[str, str]] | None = None, mode: str = "batch") -> Workflow:
    """channels: name -> initial inline items; muxes: ("a b", "c d") pairs."""
    w = Workflow(name="t", mode=mode)
    for name, items in (channels or {}).items():
        w.channels[name] = Channel(name, [InitialItem(text=t) for t in items])
    for p in processes or []:
        w.processes[p.name] = p
    for i, (src, dst) in enumerate(muxes or [], 1):
        w.muxes.append(Mux(f"mux#{i}", src.split(), dst.split()))
    return w


def proc(name: str, inputs: str = "", outputs: str = "", **kw) -> Process:
    return Process(
        name=name, image="flowd/busybox", script=kw.pop("script", "true"),
        inputs=[Port(c, c) for c in inputs.split()],
        outputs=[Port(c, c) for c in outputs.split()], **kw)


def write_file(path: str, text: str) -> str:
    """Write ``text`` at ``path`` (its folders made); returns ``path``."""
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path
