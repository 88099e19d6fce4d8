"""The workflow model: what a parsed, validated workflow file says (stdlib only).

The parser (``flowd.parser``, the one module that imports lxml) builds these
objects; the engine, the store, the executor and flowctl only read them.
``Workflow.to_dict``/``from_dict`` give the JSON form the daemon keeps beside
each run, so a restarted daemon never needs to parse XML again.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace


FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
LANGS = ("sh", "bash", "python", "node")
NETWORKS = ("none", "bridge")
ON_FAILURE = ("stop", "continue")
CONTAINERS = ("fresh", "warm")  # process@container: a new container per task, or kept ones
CACHE_CHOICES = ("yes", "no")  # process@cache: reuse the outputs of an identical earlier task (flowd/cache.py)
MODES = ("batch", "service")


@dataclass
class InitialItem:
    """An item a channel starts with: inline ``text`` or the bytes of ``file``.

    ``file`` is relative to the workflow's folder (already checked to stay
    inside it); ``<items glob=...>`` is expanded by the parser into one
    ``InitialItem`` per matching file, sorted by name.
    """

    text: str | None = None
    file: str | None = None
    line: int | None = None


@dataclass
class Channel:
    name: str
    items: list[InitialItem] = field(default_factory=list)
    line: int | None = None


@dataclass
class Port:
    """A process input or output: the channel and the file name in /task.

    ``value`` (inputs): the item is also the environment variable ``as_name``.
    ``source`` (outputs): ``file`` (the script writes /task/<as>) or ``stdout``
    (the script's standard output is the item). ``split`` (outputs): ``lines``
    makes one item per line. See flowd/channelvalues.py.
    """

    channel: str
    as_name: str
    line: int | None = None
    value: bool = False
    source: str = "file"
    split: str | None = None


@dataclass
class Process:
    name: str
    image: str
    script: str
    lang: str = "sh"
    inputs: list[Port] = field(default_factory=list)
    outputs: list[Port] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    timeout: float | None = None  # seconds
    memory: int | None = None  # bytes
    cpus: float | None = None
    parallel: int = 1
    network: str = "none"
    on_failure: str = "stop"
    container: str | None = None  # "fresh" or "warm"; None: the daemon's default_container
    placement: list[str] = field(default_factory=list)  # Swarm constraints (executor "swarm" only)
    cache: bool = False  # process@cache="yes": an identical earlier task's outputs are reused (flowd/cache.py)
    script_file: str | None = None  # where the script came from, for messages
    line: int | None = None


@dataclass
class Mux:
    name: str  # "mux#1", "mux#2", ... in file order
    sources: list[str]
    targets: list[str]
    line: int | None = None


@dataclass
class Workflow:
    name: str
    mode: str = "batch"
    description: str = ""
    channels: dict[str, Channel] = field(default_factory=dict)
    processes: dict[str, Process] = field(default_factory=dict)
    muxes: list[Mux] = field(default_factory=list)
    source: str = "workflow.xml"  # the file name, for messages

    # -- graph helpers -------------------------------------------------
    def consumers(self) -> dict[str, str]:
        """channel -> the one process or mux that reads it."""
        out: dict[str, str] = {}
        for p in self.processes.values():
            for port in p.inputs:
                out[port.channel] = p.name
        for m in self.muxes:
            for ch in m.sources:
                out[ch] = m.name
        return out

    def producers(self) -> dict[str, list[str]]:
        """channel -> the processes and muxes that write it."""
        out: dict[str, list[str]] = {}
        for p in self.processes.values():
            for port in p.outputs:
                out.setdefault(port.channel, []).append(p.name)
        for m in self.muxes:
            for ch in m.targets:
                out.setdefault(ch, []).append(m.name)
        return out

    def result_channels(self) -> list[str]:
        """Channels nobody consumes: what is left there is the run's result."""
        consumed = self.consumers()
        return [c for c in self.channels if c not in consumed]

    def files(self) -> list[str]:
        """Every workflow-relative file the workflow names (items, scripts)."""
        names: list[str] = []
        for ch in self.channels.values():
            names.extend(i.file for i in ch.items if i.file)
        names.extend(p.script_file for p in self.processes.values() if p.script_file)
        return sorted(set(names))

    def without_items(self) -> "Workflow":
        """A copy without the initial items: once a run is made they are in its
        channels on disk, and a run of 100,000 items keeps no list of them."""
        if not any(ch.items for ch in self.channels.values()):
            return self
        return replace(self, channels={k: replace(ch, items=[]) for k, ch in self.channels.items()})

    # -- JSON form -----------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["format"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Workflow":
        channels = {
            k: Channel(
                name=v["name"],
                items=[InitialItem(**i) for i in v.get("items", [])],
                line=v.get("line"),
            )
            for k, v in d.get("channels", {}).items()
        }
        processes = {}
        for k, v in d.get("processes", {}).items():
            v = dict(v)
            v["inputs"] = [Port(**p) for p in v.get("inputs", [])]
            v["outputs"] = [Port(**p) for p in v.get("outputs", [])]
            processes[k] = Process(**v)
        muxes = [Mux(**m) for m in d.get("muxes", [])]
        return cls(
            name=d["name"],
            mode=d.get("mode", "batch"),
            description=d.get("description", ""),
            channels=channels,
            processes=processes,
            muxes=muxes,
            source=d.get("source", "workflow.xml"),
        )
