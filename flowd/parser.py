"""Read, check and translate a workflow XML file into a ``flowd.model.Workflow``.

This is the one module in flowd that imports lxml. Entry point::

    workflow, warnings = load_workflow("path/to/workflow.xml")

On any error it raises ``flowd.errors.WorkflowError`` listing every problem it
found (each with the file, line, element, message and fix); warnings come back
as ``Problem(severity="warning")``. No lxml exception, and no traceback, ever
leaves this module.

Hostile files. The parser reads exactly one file, the one it is given:

1. the file is opened without blocking, must be a regular file, and at most
   ``MAX_XML_BYTES + 1`` bytes are read (the size is checked before parsing);
2. it must be UTF-8 text (no NUL bytes, no other declared encoding);
3. the prolog is scanned *before* lxml sees the bytes: any ``<!DOCTYPE`` is
   rejected there, so no DTD, entity declaration, external entity or
   parameter entity ever reaches libxml2;
4. lxml runs with ``resolve_entities=False, no_network=True, load_dtd=False,
   dtd_validation=False, huge_tree=False`` (libxml2's depth and entity
   amplification limits stay on) and a resolver that answers every request
   for an outside document with nothing. Do NOT pass ``collect_ids=False``:
   with lxml 6 / libxml2 2.14 that option makes libxml2 open external
   parameter entities (seen with strace);
5. after parsing: no DOCTYPE, no XInclude element or namespace, at most
   ``MAX_DEPTH`` levels of elements; ``.xinclude()`` is never called.

Then the checks of SPEC section 1 (names, values, paths, channels, consumers,
cycles) run in Python, which names each problem precisely, and the shipped
RelaxNG schema (``flowd/schema/workflow.rng``) validates the shape as a
backstop: its (terser) findings are reported when the Python checks found
nothing.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import math
import os
import posixpath
import re
import stat
import textwrap
import threading
from pathlib import Path

from lxml import etree

from flowd import model
from flowd.errors import Problem, WorkflowError
from flowd.model import Channel, InitialItem, Mux, Port, Process, Workflow

__all__ = ["load_workflow", "MAX_XML_BYTES", "MAX_DEPTH", "SCHEMA_PATH"]

log = logging.getLogger(__name__)

MAX_XML_BYTES = 1024 * 1024  # a workflow file is at most 1 MiB
MAX_SCRIPT_BYTES = 1024 * 1024  # and so is a script given by file=
MAX_DEPTH = 64  # levels of nested elements (the format needs 3)
MAX_PROBLEMS = 200  # report at most this many, then say how many more
MAX_COUNT = 1_000_000  # upper bound of retries= and parallel=
MAX_GLOBS = 256  # <items glob=...> per file (each one reads a folder)
MAX_GLOB_MATCHES = 100_000  # paths one glob may match
MIN_MEMORY = 6 * 1024 * 1024  # Docker refuses a memory limit below 6 MiB
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "workflow.rng"

XINCLUDE_NAMESPACES = (
    "http://www.w3.org/2001/XInclude",
    "http://www.w3.org/2003/XInclude",
)

AS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Docker's image reference grammar (github.com/distribution/reference):
#   reference := name [":" tag] ["@" digest]
#   name      := [domain "/"] path-component ["/" path-component]*     (at most 255)
#   domain    := host [":" port]; host := domain-name   (flowd takes no "[IPv6]" host:
#                the schema's character set has no brackets)
#   path-component := [a-z0-9]+ (separator [a-z0-9]+)*, separator := . | _ | __ | -+
#   tag       := [\w][\w.-]{0,127}
#   digest    := algorithm ":" hex; algorithm := [A-Za-z][A-Za-z0-9]* ([+._-][A-Za-z][A-Za-z0-9]*)*
IMAGE_NAME_MAX = 255
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IMAGE_HOST_RE = re.compile(rf"^{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?$")
_IMAGE_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_IMAGE_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_IMAGE_ALGORITHM_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[+._-][A-Za-z][A-Za-z0-9]*)*$")
_IMAGE_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}  # what Docker can check
_IMAGE_ID_RE = re.compile(r"^[a-f0-9]{64}$")


def image_reference_problem(ref: str) -> str | None:
    """Why Docker would refuse ``ref`` as an image reference, or None if it is valid."""
    if not ref:
        return "it is empty"
    if ref != ref.strip() or any(c.isspace() for c in ref):
        return "it holds white space"
    if len(ref) > IMAGE_NAME_MAX:  # Docker bounds the name; flowd the whole reference
        return f"it is longer than {IMAGE_NAME_MAX} characters"
    name, at, digest = ref.partition("@")
    if at:
        algorithm, colon, hexpart = digest.partition(":")
        if "@" in digest:
            return "it has more than one @; write at most one @DIGEST, at the end"
        if not colon or not algorithm or not hexpart:
            return f"the digest {_q(digest)} is not ALGORITHM:HEX, e.g. sha256: and 64 hex digits"
        if not _IMAGE_ALGORITHM_RE.match(algorithm):
            return f"the digest's algorithm {_q(algorithm)} is not valid"
        want = _IMAGE_DIGEST_HEX.get(algorithm)
        if want is None:
            return (f"the digest's algorithm {_q(algorithm)} is not one Docker supports "
                    "(sha256, sha384, sha512)")
        if len(hexpart) != want or not re.fullmatch(r"[a-f0-9]+", hexpart):
            return f"a {algorithm} digest is {want} lowercase hex digits (0-9, a-f)"
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:  # the tag: after the last ":" that follows the last "/"
        name, tag = name[:colon], name[colon + 1:]
        if not _IMAGE_TAG_RE.match(tag):
            return (f"the tag {_q(tag)} is not valid: a tag is 1 to 128 letters, digits, _ . -, "
                    "not starting with . or -")
    if not name:
        return "it has no name before the tag or digest"
    parts = name.split("/")
    if "" in parts:
        return "it has an empty path part (a doubled / or a / at either end)"
    if len(parts) > 1 and _IMAGE_HOST_RE.match(parts[0]):
        parts = parts[1:]  # a registry (host[:port]), which may hold capitals
    elif len(parts) > 1 and any(c in parts[0] for c in ".:[]"):
        return f"the registry {_q(parts[0])} is not a host name or host:port"
    for part in parts:
        if ":" in part:
            return (f"the name part {_q(part)} holds \":\"; only one :TAG is allowed, after the "
                    "name (and a :PORT after a registry host)")
        if part.lower() != part and _IMAGE_PATH_COMPONENT_RE.match(part.lower()):
            return "the repository name must be lowercase"
        if not _IMAGE_PATH_COMPONENT_RE.match(part):
            return (f"the name part {_q(part)} is not valid: lowercase letters and digits, "
                    "separated by one . or _, two __, or dashes, with none at either end")
    if len(parts) == 1 and _IMAGE_ID_RE.match(parts[0]):
        return "a 64-digit hexadecimal name is an image id, not a name Docker accepts here"
    return None


def _image_suggestion(ref: str) -> str:
    """A fix for a bad image reference: the nearest valid one, else an example."""
    guess = re.sub(r"/+", "/", ref.strip()).strip("/")
    name, at, digest = guess.partition("@")
    slash = name.rfind("/")
    if name.rfind(":") > slash:
        colon = name.rfind(":")
        name, tag = name[:colon].lower(), name[colon:]
    else:
        name, tag = name.lower(), ""
    guess = name + tag + at + digest
    if guess != ref and image_reference_problem(guess) is None:
        return f"write image={_q(guess)}"
    return f"write {EXAMPLES['image']}"
COUNT_RE = re.compile(r"^[0-9]+$")
DECIMAL_RE = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")
_ENCODING_RE = re.compile(rb"""^\s*<\?xml[^>]*?\bencoding\s*=\s*["']([^"']*)["']""")

PROCESS_ATTRS = (
    "image", "lang", "retries", "timeout", "memory", "cpus", "parallel",
    "network", "on-failure",
)

# element -> (required attributes, optional attributes)
ATTRS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "workflow": (("name",), ("mode",)),
    "description": ((), ()),
    "defaults": ((), PROCESS_ATTRS),
    "channel": (("name",), ()),
    "item": ((), ("file",)),
    "items": (("glob",), ()),
    "process": (("name",), PROCESS_ATTRS),
    "input": (("channel",), ("as",)),
    "output": (("channel",), ("as",)),
    "env": (("name", "value"), ()),
    "script": ((), ("file",)),
    "mux": (("from", "to"), ()),
}
# element -> elements allowed inside it
CHILDREN: dict[str, tuple[str, ...]] = {
    "workflow": ("description", "defaults", "channel", "process", "mux"),
    "channel": ("item", "items"),
    "process": ("input", "output", "env", "script"),
}
TEXT_ELEMENTS = ("description", "item", "script")  # hold text, no elements
PARENT_OF = {child: parent for parent, kids in CHILDREN.items() for child in kids}

EXAMPLES = {  # used in "fix:" hints
    "image": 'image="busybox:1.36"',
    "lang": 'lang="python"',
    "retries": 'retries="2"',
    "timeout": 'timeout="90s"',
    "memory": 'memory="256m"',
    "cpus": 'cpus="0.5"',
    "parallel": 'parallel="4"',
    "network": 'network="bridge"',
    "on-failure": 'on-failure="continue"',
    "mode": 'mode="service"',
    "as": 'as="input.txt"',
}


class _Fatal(Exception):
    """Stop here: the file cannot be read any further."""

    def __init__(self, problems: list[Problem]):
        super().__init__("fatal")
        self.problems = problems


def _q(value: str, limit: int = 60) -> str:
    """Quote a (possibly hostile) value for a message: short, one line."""
    if len(value) > limit:
        value = value[:limit] + "…"
    return json.dumps(value, ensure_ascii=False)


def _closest(word: str, candidates) -> str | None:
    """The candidate closest to ``word`` (for "did you mean"), if any is close."""
    cands = list(candidates)
    if not word or not cands or len(cands) > 500:  # difflib is quadratic-ish
        return None
    best = difflib.get_close_matches(word, cands, n=1, cutoff=0.6)
    return best[0] if best else None


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, max(offset, 0)) + 1


# -- the lxml layer ----------------------------------------------------------

class _DenyResolver(etree.Resolver):
    """Answer every request for an outside document (DTD, entity, include)
    with an empty string, so libxml2 never opens a file or a URL."""

    def resolve(self, url, pubid, context):  # noqa: D401 - lxml API
        return self.resolve_string("", context)


def _make_parser() -> etree.XMLParser:
    """A fresh safe parser (lxml parsers must not be shared across threads)."""
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        attribute_defaults=False,
        remove_comments=True,  # so <item>a<!-- x -->b</item> is "ab"
        remove_pis=True,
        remove_blank_text=False,  # item text is kept byte for byte
        strip_cdata=True,  # CDATA sections become plain text
        recover=False,
        # collect_ids=False is deliberately NOT set: see the module docstring.
    )
    parser.resolvers.add(_DenyResolver())
    return parser


_schema_lock = threading.Lock()
_schema: etree.RelaxNG | None = None


def _relaxng() -> etree.RelaxNG:
    global _schema
    with _schema_lock:
        if _schema is None:
            data = SCHEMA_PATH.read_bytes()
            _schema = etree.RelaxNG(etree.fromstring(data, _make_parser()))
        return _schema


# -- reading the bytes ---------------------------------------------------------

def _read_capped(path, display: str) -> bytes:
    def fatal(message: str, fix: str | None = None):
        raise _Fatal([Problem(display, None, None, message, fix)])

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        fatal("no such file", "check the path")
    except IsADirectoryError:
        fatal("this is a folder, not a workflow file", "name the .xml file inside it")
    except PermissionError:
        fatal("permission denied: flowd cannot read this file", "check the file's mode")
    except (OSError, ValueError) as exc:
        fatal(f"cannot open the file: {getattr(exc, 'strerror', None) or exc}")
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            fatal("this is a folder, not a workflow file", "name the .xml file inside it")
        if not stat.S_ISREG(st.st_mode):
            fatal("this is not a regular file (a device, socket or pipe?)",
                  "give the path of a workflow .xml file")
        too_big = (f"the file is larger than {MAX_XML_BYTES // 1024 // 1024} MiB, "
                   "the limit for a workflow file")
        big_fix = "keep data out of the workflow: use <item file=...> or <items glob=...>"
        if st.st_size > MAX_XML_BYTES:
            fatal(too_big, big_fix)
        chunks: list[bytes] = []
        got = 0
        while got <= MAX_XML_BYTES:
            chunk = os.read(fd, MAX_XML_BYTES + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > MAX_XML_BYTES:
            fatal(too_big, big_fix)
        return b"".join(chunks)
    except OSError as exc:
        fatal(f"cannot read the file: {exc.strerror or exc}")
    finally:
        os.close(fd)
    raise AssertionError("unreachable")  # pragma: no cover


def _check_bytes(data: bytes, display: str) -> None:
    def fatal(line, message, fix=None):
        raise _Fatal([Problem(display, line, None, message, fix)])

    if not data.strip():
        fatal(None, "the file is empty",
              'a workflow starts with <workflow name="...">')
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        fatal(1, "the file is UTF-16; flowd reads UTF-8 only", "save the file as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        fatal(_line_of(data, nul),
              "the file contains NUL bytes: it is binary or UTF-16, not a UTF-8 XML file",
              "save it as UTF-8 text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        fatal(_line_of(data, exc.start),
              f"the file is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
              "save the file as UTF-8")
    m = _ENCODING_RE.match(data.lstrip(b"\xef\xbb\xbf"))
    if m and m.group(1).lower().replace(b"_", b"-") not in (b"utf-8", b"utf8", b"us-ascii", b"ascii"):
        fatal(1, f"the file declares encoding {_q(m.group(1).decode('ascii', 'replace'))}; "
                 "flowd reads UTF-8 only",
              'convert the file to UTF-8 and write encoding="UTF-8" (or leave it out)')


_DTD_MESSAGE = "DTDs and entities are not allowed: flowd reads only the file it is given"
_DTD_FIX = ("remove the <!DOCTYPE ...> and any entity; write &amp; &lt; &gt; &quot; "
            "&apos; or character references like &#233; instead")


def _check_prolog(data: bytes, display: str) -> None:
    """Reject a DOCTYPE before lxml sees the bytes.

    A DOCTYPE can only stand in the prolog, before the root element: skip
    the XML declaration, comments, processing instructions and white space,
    and look at what comes next. (Text such as ``<!DOCTYPE`` inside a CDATA
    section of a script is therefore fine.)
    """
    i = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    n = len(data)
    while i < n:
        while i < n and data[i] in b" \t\r\n":
            i += 1
        if data.startswith(b"<?", i):
            end = data.find(b"?>", i + 2)
            if end < 0:
                return
            i = end + 2
        elif data.startswith(b"<!--", i):
            end = data.find(b"-->", i + 4)
            if end < 0:
                return
            i = end + 3
        elif data.startswith(b"<!", i):
            if data[i + 2:i + 9].upper() == b"DOCTYPE" or data[i + 2:i + 8].upper() == b"ENTITY":
                raise _Fatal([Problem(display, _line_of(data, i), "!DOCTYPE",
                                      _DTD_MESSAGE, _DTD_FIX)])
            return
        else:
            return


def _syntax_problem(exc: etree.XMLSyntaxError, display: str) -> Problem:
    msg = str(getattr(exc, "msg", "") or exc)
    msg = re.sub(r",? line \d+, column \d+.*$", "", msg).strip() or "not well-formed"
    if len(msg) > 300:
        msg = msg[:300] + "…"
    line = getattr(exc, "lineno", None) or None
    low = msg.lower()
    if "excessive depth" in low:
        return Problem(display, line, None,
                       f"elements are nested too deeply (more than {MAX_DEPTH} levels)",
                       "a workflow needs only three levels: <workflow>, <process>, <script>")
    fix = "correct the XML at this line: is a tag not closed, or a quote missing?"
    if "entityref" in low:
        msg = f"a & that does not start an entity reference ({msg})"
        fix = "write a literal & as &amp; and < as &lt; (or wrap the text in <![CDATA[ ... ]]>)"
    elif "entity" in low or "doctype" in low:
        return Problem(display, line, None, f"{_DTD_MESSAGE} ({msg})", _DTD_FIX)
    return Problem(display, line, None, f"XML syntax error: {msg}", fix)


def _parse_xml(data: bytes, display: str) -> etree._Element:
    """Parse with the safe parser; reject DTDs, XInclude and deep nesting."""
    try:
        root = etree.fromstring(data, _make_parser())
    except etree.XMLSyntaxError as exc:
        raise _Fatal([_syntax_problem(exc, display)]) from None
    except (etree.LxmlError, ValueError) as exc:
        raise _Fatal([Problem(display, None, None, f"cannot parse the file: {exc}")]) from None
    if root is None:  # pragma: no cover - lxml raises instead
        raise _Fatal([Problem(display, None, None, "the file holds no XML element")])
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise _Fatal([Problem(display, 1, "!DOCTYPE", _DTD_MESSAGE, _DTD_FIX)])
    # Depth-first walk without recursion; stops descending past MAX_DEPTH.
    xi_element = xi_declared = None
    stack = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        if not isinstance(el.tag, str):
            if isinstance(el, etree._Entity):
                raise _Fatal([Problem(display, el.sourceline, None, _DTD_MESSAGE, _DTD_FIX)])
            continue
        if depth > MAX_DEPTH:
            raise _Fatal([Problem(display, el.sourceline, None,
                                  f"elements are nested too deeply (more than {MAX_DEPTH} levels)",
                                  "a workflow needs only three levels: <workflow>, <process>, <script>")])
        if xi_element is None and (
            (el.tag.startswith("{") and etree.QName(el).namespace in XINCLUDE_NAMESPACES)
            or any(k.startswith("{") and etree.QName(k).namespace in XINCLUDE_NAMESPACES for k in el.attrib)
        ):
            xi_element = el
        if xi_declared is None and set(el.nsmap.values()).intersection(XINCLUDE_NAMESPACES):
            xi_declared = el
        stack.extend((child, depth + 1) for child in reversed(el))
    bad = xi_element if xi_element is not None else xi_declared
    if bad is not None:
        raise _Fatal([Problem(display, bad.sourceline, etree.QName(bad).localname,
                              "XInclude is not allowed: flowd reads only the file it is given",
                              "remove the xi:include and its namespace; put the text in the "
                              "workflow, or use <item file=...> / <script file=...>")])
    return root


_RNG_PATTERNS = [  # libxml2's RelaxNG messages (the same in 2.9 and 2.14) -> friendlier ones
    (re.compile(r"^Element (\S+) has extra content: text$"),
     lambda m: (m.group(1), f"unexpected text inside <{m.group(1)}>")),
    (re.compile(r"^Did not expect text in element (\S+) content$"),
     lambda m: (m.group(1), f"unexpected text inside <{m.group(1)}>")),
    (re.compile(r"^Element (\S+) has extra content: (\S+)$"),
     lambda m: (m.group(2), f"unknown or misplaced element <{m.group(2)}> inside <{m.group(1)}>")),
    (re.compile(r"^Invalid attribute (\S+) for element (\S+)$"),
     lambda m: (m.group(2), f'attribute "{m.group(1)}" is not allowed here, or its value is invalid')),
    (re.compile(r"^Element (\S+) failed to validate attributes$"),
     lambda m: (m.group(1), "a required attribute is missing, or an attribute's value is invalid")),
    (re.compile(r"^Expecting element (\S+), got (\S+)$"),
     lambda m: (m.group(2), f"expected <{m.group(1)}> here, found <{m.group(2)}>")),
    (re.compile(r"^Expecting an element (\S*), ?got nothing$"),
     lambda m: (None, "a required element is missing here (a <process> needs a <script>)")),
    (re.compile(r"^Did not expect element (\S+) there$"),
     lambda m: (m.group(1), f"element <{m.group(1)}> is not allowed here (unknown, misplaced or repeated)")),
    (re.compile(r"^Extra element (\S+) in interleave$"),
     lambda m: (m.group(1), f"element <{m.group(1)}> is not allowed here, or appears too often")),
    (re.compile(r"^Element (\S+) failed to validate content$"),
     lambda m: (None, f"the content of <{m.group(1)}> does not match the workflow format")),
]
# Follow-on messages, shown only when nothing more precise was found. ("Expecting
# element description" comes from the grammar's choice of where <defaults> may be.)
_RNG_GENERIC = re.compile(r"failed to validate content|Invalid sequence in interleave|"
                          r"Extra element \S+ in interleave|failed to validate type|"
                          r"^Expecting element description, got")


def _schema_problems(root: etree._Element, display: str) -> list[Problem]:
    """Validate against the shipped RelaxNG schema; translate its error log."""
    try:
        schema = _relaxng()
    except (OSError, etree.LxmlError) as exc:
        return [Problem(display, None, None,
                        f"flowd's own schema {SCHEMA_PATH} could not be loaded: {exc}",
                        "reinstall flowd: the package is incomplete")]
    with _schema_lock:
        if schema.validate(root):
            return []
        entries = list(schema.error_log)
    fix = "compare with the workflow format (SPEC section 1; schema flowd/schema/workflow.rng)"
    found: list[Problem] = []
    generic: list[tuple[int, Problem]] = []
    seen = set()
    for entry in entries:
        raw = (entry.message or "").strip()
        element = None
        path = entry.path or ""
        if path:
            element = re.sub(r"\[\d+\]$", "", path.rsplit("/", 1)[-1]) or None
        message = None
        for rx, make in _RNG_PATTERNS:
            m = rx.match(raw)
            if m:
                el2, message = make(m)
                element = el2 or element
                break
        if message is None:
            message = f"does not match the workflow format: {raw[:200]}"
        line = entry.line if entry.line and entry.line > 0 else None
        if line is None and path == "":
            line = root.sourceline
        key = (line, element, message)
        if key in seen:
            continue
        seen.add(key)
        problem = Problem(display, line, element, message, fix)
        if _RNG_GENERIC.search(raw):
            generic.append((path.count("/"), problem))
        else:
            found.append(problem)
    if not found and generic:  # the deepest follow-on message is the most precise
        found = [max(generic, key=lambda g: g[0])[1]]
    return found or [Problem(display, root.sourceline, "workflow",
                             "the file does not match the workflow format", fix)]


# -- the model builder -----------------------------------------------------------

class _Builder:
    def __init__(self, display: str, base: str, root: etree._Element):
        self.display = display
        self.base = base
        self.root = root
        self.globs = 0
        self._paths: dict[tuple[str, str], str | None] = {}
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.dropped_errors = 0
        self.dropped_warnings = 0

    # reporting
    def error(self, el, message: str, fix: str | None = None, *, line=None, element=None):
        self._add(el, message, fix, "error", line, element)

    def warn(self, el, message: str, fix: str | None = None, *, line=None, element=None):
        self._add(el, message, fix, "warning", line, element)

    def _add(self, el, message, fix, severity, line, element):
        bucket = self.errors if severity == "error" else self.warnings
        if len(bucket) >= MAX_PROBLEMS:
            if severity == "error":
                self.dropped_errors += 1
            else:
                self.dropped_warnings += 1
            return
        if el is not None:
            line = line if line is not None else el.sourceline
            element = element if element is not None else el.tag
        bucket.append(Problem(self.display, line, element, message, fix, severity))

    def has_errors(self) -> bool:
        return bool(self.errors)

    def room(self) -> bool:
        """Whether another error would still be shown (skip costly hints if not)."""
        return len(self.errors) < MAX_PROBLEMS

    # generic shape checks --------------------------------------------------
    def check_shape(self, el) -> list:
        """Attributes and children of ``el``; returns its known child elements."""
        tag = el.tag
        required, optional = ATTRS[tag]
        allowed = required + optional
        for key in el.attrib:
            if key in allowed:
                continue
            local = key
            if key.startswith("{"):
                q = etree.QName(key)
                local = ("xml:" if q.namespace == "http://www.w3.org/XML/1998/namespace" else "") + q.localname
            if tag == "defaults" and key == "name":
                self.error(el, 'attribute "name" cannot have a default: every process names itself',
                           'remove name="..." from <defaults>')
                continue
            best = _closest(local, allowed) if self.room() else None
            fix = f"allowed on <{tag}>: " + (", ".join(allowed) if allowed else "no attributes")
            self.error(el, f"unknown attribute {_q(local)}" + (f"; did you mean {_q(best)}?" if best else ""),
                       fix)
        for key in required:
            if key not in el.attrib:
                self.error(el, f"missing required attribute {_q(key)}",
                           f'write <{tag} {key}="..."' + (" .../>" if tag != "workflow" else " ...>"))
        allowed_children = CHILDREN.get(tag, ())
        kids = []
        if tag not in TEXT_ELEMENTS:
            self._check_no_text(el, el.text, el)
        for child in el:
            if not isinstance(child.tag, str):
                continue
            if tag not in TEXT_ELEMENTS:
                self._check_no_text(el, child.tail, child)
            ctag = child.tag
            if ctag in allowed_children:
                kids.append(child)
                continue
            name = ctag = _short(ctag)
            if ctag.startswith("{"):
                name = _short(etree.QName(child).localname)
                self.error(child, f"element {_q(ctag)} is in an XML namespace; flowd files use none",
                           "remove the namespace prefix and xmlns declaration", element=name)
                continue
            if not allowed_children and tag not in TEXT_ELEMENTS:
                self.error(child, f"<{tag}> must be empty; <{name}> cannot go inside it",
                           f"write <{tag} .../> and put <{name}> where it belongs", element=name)
            elif tag in TEXT_ELEMENTS:
                self.error(child, f"<{tag}> holds text only, not elements",
                           "write < as &lt; and & as &amp;, or wrap the text in <![CDATA[ ... ]]>",
                           element=name)
            elif ctag in PARENT_OF:
                self.error(child, f"<{ctag}> is not allowed inside <{tag}>; it belongs inside <{PARENT_OF[ctag]}>",
                           f"move it into a <{PARENT_OF[ctag]}>")
            elif ctag in ATTRS:  # workflow
                self.error(child, f"<{ctag}> is not allowed inside <{tag}>",
                           "a file holds exactly one <workflow>")
            else:
                best = _closest(ctag, allowed_children) if self.room() else None
                did = f"; did you mean <{best}>?" if best else ""
                self.error(child, f"unknown element <{ctag}> inside <{tag}>{did}",
                           f"allowed inside <{tag}>: " + ", ".join(f"<{c}>" for c in allowed_children))
        return kids

    def _check_no_text(self, parent, text, at):
        if text and text.strip():
            self.error(at, f"unexpected text {_q(text.strip(), 40)} inside <{parent.tag}>",
                       "remove it; put commands in <script> and items in <item>",
                       line=at.sourceline, element=parent.tag)

    # values ----------------------------------------------------------------------
    def name_attr(self, el, attr: str = "name") -> str | None:
        value = el.get(attr)
        if value is None:
            return None
        if not model.NAME_RE.match(value):
            self.error(el, f"{attr} {_q(value)} is not a valid name: names start with a letter, "
                           "then letters, digits, _ or -, at most 63 characters",
                       f'write {attr}="{_example_name(value)}"')
            return None
        return value

    def choice(self, el, attr, value, options):
        v = value.strip()
        if v in options:
            return v
        best = _closest(v, options)
        self.error(el, f"attribute {_q(attr)} is {_q(value)}; it must be one of " + ", ".join(options)
                       + (f"; did you mean {_q(best)}?" if best else ""),
                   f"write {attr}={_q(best)}" if best else f"write {EXAMPLES.get(attr, attr + '=' + _q(options[0]))}")
        return None

    def count(self, el, attr, value, minimum):
        v = value.strip()
        number = int(v) if COUNT_RE.match(v) and len(v) <= 12 else None
        if number is not None and minimum <= number <= MAX_COUNT:
            return number
        if number is None and COUNT_RE.match(v) or (number is not None and number > MAX_COUNT):
            what = f"a whole number from {minimum} to {MAX_COUNT}"
        else:
            what = f"a whole number {minimum} or more"
        self.error(el, f"attribute {_q(attr)} is {_q(value)}; it must be {what}",
                   f"write {EXAMPLES[attr]}")
        return None

    def process_attr(self, el, attr: str, value: str):
        """Parse one process attribute (also used for <defaults>); None if bad."""
        if attr == "image":
            why = image_reference_problem(value)
            if why is None:
                return value
            self.error(el, f"attribute \"image\" is {_q(value)}; it is not a Docker image reference: {why}",
                       _image_suggestion(value))
            return None
        if attr == "lang":
            return self.choice(el, attr, value, model.LANGS)
        if attr == "network":
            return self.choice(el, attr, value, model.NETWORKS)
        if attr == "on-failure":
            return self.choice(el, attr, value, model.ON_FAILURE)
        if attr == "retries":
            return self.count(el, attr, value, 0)
        if attr == "parallel":
            return self.count(el, attr, value, 1)
        if attr == "timeout":
            try:
                seconds = model.parse_duration(value)
                if not math.isfinite(seconds):
                    raise ValueError
                return seconds
            except (ValueError, OverflowError):
                self.error(el, f"attribute \"timeout\" is {_q(value)}; it must be a duration "
                               "more than zero such as 90s, 5m, 2h or 250ms",
                           f"write {EXAMPLES['timeout']}")
                return None
        if attr == "memory":
            try:
                size = model.parse_size(value)
            except (ValueError, OverflowError):
                self.error(el, f"attribute \"memory\" is {_q(value)}; it must be a size such as "
                               "256m, 1g or 512MiB", f"write {EXAMPLES['memory']}")
                return None
            if size < MIN_MEMORY:
                self.error(el, f"attribute \"memory\" is {_q(value)} ({size} bytes); Docker refuses "
                               "a memory limit below 6 MiB", f"write {EXAMPLES['memory']}")
                return None
            return size
        if attr == "cpus":
            v = value.strip()
            if DECIMAL_RE.match(v) and len(v) <= 20:
                cpus = float(v)
                if cpus > 0 and math.isfinite(cpus):
                    return cpus
            self.error(el, f"attribute \"cpus\" is {_q(value)}; it must be a decimal number "
                           "more than zero, such as 0.5 or 2", f"write {EXAMPLES['cpus']}")
            return None
        raise AssertionError(attr)  # pragma: no cover

    # paths -----------------------------------------------------------------------
    def rel_path(self, el, attr: str, value: str) -> str | None:
        """Check a file= value: relative, inside the base folder, a regular file."""
        norm = self._norm(el, attr, value)
        if norm is None:
            return None
        if (attr, norm) in self._paths and self._paths[(attr, norm)] is not None:
            return norm  # already checked (a file named many times)
        self._paths[(attr, norm)] = result = self._check_file(el, attr, value, norm)
        return result

    def _check_file(self, el, attr: str, value: str, norm: str) -> str | None:
        real = os.path.realpath(os.path.join(self.base, norm))
        if not _inside(real, self.base):
            self.error(el, f'{attr}={_q(value)} leads outside the workflow\'s folder '
                           f"(through a symbolic link, to {_q(real, 120)})",
                       "copy the file into the workflow's folder instead of linking to it")
            return None
        try:
            st = os.stat(real)
        except FileNotFoundError:
            self.error(el, f"{attr}={_q(value)}: no such file in the workflow's folder",
                       "check the name; paths are relative to the workflow file's folder")
            return None
        except OSError as exc:
            self.error(el, f"{attr}={_q(value)} cannot be read: {exc.strerror}",
                       "check the path and its permissions")
            return None
        if stat.S_ISDIR(st.st_mode):
            self.error(el, f"{attr}={_q(value)} is a folder, not a file",
                       f'name a file, or use <items glob="{norm}/*"/> for every file in it')
            return None
        if not stat.S_ISREG(st.st_mode):
            self.error(el, f"{attr}={_q(value)} is not a regular file",
                       "name a regular file")
            return None
        return norm

    def _norm(self, el, attr: str, value: str) -> str | None:
        if value == "" or not value.strip():
            self.error(el, f"{attr}= is empty", f'write {attr}="data/input.txt"')
            return None
        if value.startswith("/") or os.path.isabs(value):
            self.error(el, f"{attr}={_q(value)} is an absolute path; paths must be relative "
                           "to the workflow file's folder and stay inside it",
                       "copy the file next to the workflow and write a relative path, "
                       f'e.g. {attr}="data/{posixpath.basename(value) or "input.txt"}"')
            return None
        norm = posixpath.normpath(value)
        if norm == ".." or norm.startswith("../"):
            self.error(el, f"{attr}={_q(value)} goes up out of the workflow's folder with \"..\"; "
                           "paths must stay inside it",
                       "copy the file into the workflow's folder and name it from there")
            return None
        if norm == ".":
            self.error(el, f"{attr}={_q(value)} names the workflow's folder itself",
                       f'write {attr}="data/input.txt"')
            return None
        return norm

    def expand_glob(self, el, value: str) -> list[str]:
        norm = self._norm(el, "glob", value)
        if norm is None:
            return []
        self.globs += 1
        if self.globs > MAX_GLOBS:
            if self.globs == MAX_GLOBS + 1:
                self.error(el, f"more than {MAX_GLOBS} <items glob=...> in one workflow",
                           "use fewer, broader patterns such as \"data/*.txt\"")
            return []
        try:
            matches = _expand_glob(self.base, norm)
        except _TooMany:
            self.error(el, f"glob={_q(value)} matches more than {MAX_GLOB_MATCHES} paths",
                       "use a narrower pattern, or fewer files")
            return []
        files: list[str] = []
        outside: list[str] = []
        for rel in matches:
            rel = posixpath.normpath(rel.replace(os.sep, "/"))
            real = os.path.realpath(os.path.join(self.base, rel))
            if not _inside(real, self.base):
                outside.append(rel)
                continue
            try:
                if stat.S_ISREG(os.stat(real).st_mode):
                    files.append(rel)
            except OSError:
                continue
        if outside:
            more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
            self.error(el, f"glob={_q(value)} matches {_q(outside[0])}{more}, which leads outside "
                           "the workflow's folder through a symbolic link",
                       "copy the files into the workflow's folder instead of linking to them")
            return []
        if not files:
            self.error(el, f"glob={_q(value)} matches no file in the workflow's folder",
                       "check the pattern (relative to the workflow file's folder, e.g. "
                       '"data/*.txt"), or add the files')
        return files

    def read_script(self, el, norm: str) -> str | None:
        real = os.path.realpath(os.path.join(self.base, norm))
        try:
            with open(real, "rb") as f:
                data = f.read(MAX_SCRIPT_BYTES + 1)
        except OSError as exc:
            self.error(el, f"script file {_q(norm)} cannot be read: {exc.strerror}",
                       "check the file's permissions")
            return None
        if len(data) > MAX_SCRIPT_BYTES:
            self.error(el, f"script file {_q(norm)} is larger than 1 MiB",
                       "keep scripts small; put data in channels")
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.error(el, f"script file {_q(norm)} is not UTF-8 text", "save it as UTF-8")
            return None

    # the whole workflow -------------------------------------------------------
    def build(self) -> Workflow:
        root = self.root
        if root.tag != "workflow":
            q = etree.QName(root)
            tag = _short(q.localname)
            if q.namespace:
                raise _Fatal([Problem(self.display, root.sourceline, tag,
                                      f"the root element is in the XML namespace {_q(q.namespace)}; "
                                      "flowd files use no namespace",
                                      'remove xmlns="..." from the root element')])
            raise _Fatal([Problem(self.display, root.sourceline, tag,
                                  f"the root element is <{tag}>; a flowd file's root element is <workflow>",
                                  'start the file with <workflow name="...">')])
        kids = self.check_shape(root)
        wf_name = self.name_attr(root) or "workflow"
        mode = "batch"
        if root.get("mode") is not None:
            mode = self.choice(root, "mode", root.get("mode"), model.MODES) or "batch"
        wf = Workflow(name=wf_name, mode=mode, source=self.display)

        defaults: dict[str, object] = {}
        seen_part = None
        descriptions = []
        default_els = []
        for el in kids:
            if el.tag == "description":
                descriptions.append(el)
            elif el.tag == "defaults":
                default_els.append(el)
                if seen_part is not None:
                    self.error(el, f"<defaults> must come before every <channel>, <process> and "
                                   f"<mux> (here it follows <{seen_part.tag}> of line {seen_part.sourceline})",
                               "move <defaults> to the top of <workflow>")
            else:
                seen_part = seen_part if seen_part is not None else el
        for extra in descriptions[1:]:
            self.error(extra, f"a second <description> (the first is at line {descriptions[0].sourceline})",
                       "keep one <description>")
        for extra in default_els[1:]:
            self.error(extra, f"a second <defaults> (the first is at line {default_els[0].sourceline})",
                       "merge them into one <defaults>")
        if descriptions:
            self.check_shape(descriptions[0])
            wf.description = (descriptions[0].text or "").strip()
        for el in default_els[:1]:
            self.check_shape(el)
            for attr in PROCESS_ATTRS:
                if el.get(attr) is not None:
                    value = self.process_attr(el, attr, el.get(attr))
                    if value is not None:
                        defaults[attr] = value

        channel_lines: dict[str, int | None] = {}
        process_lines: dict[str, int | None] = {}
        mux_count = 0
        for el in kids:
            if el.tag == "channel":
                self.build_channel(el, wf, channel_lines)
            elif el.tag == "process":
                self.build_process(el, wf, defaults, process_lines)
            elif el.tag == "mux":
                mux_count += 1
                self.build_mux(el, wf, f"mux#{mux_count}")
        return wf

    def build_channel(self, el, wf: Workflow, lines: dict):
        kids = self.check_shape(el)
        name = self.name_attr(el)
        items: list[InitialItem] = []
        for child in kids:
            self.check_shape(child)
            if child.tag == "item":
                text = child.text or ""
                if child.get("file") is not None:
                    if text.strip():
                        self.error(child, "<item> has both file= and text; an item is one or the other",
                                   "remove the text, or remove file=")
                        continue
                    norm = self.rel_path(child, "file", child.get("file"))
                    if norm is not None:
                        items.append(InitialItem(file=norm, line=child.sourceline))
                else:
                    items.append(InitialItem(text=text, line=child.sourceline))
            elif child.get("glob") is not None:
                for rel in self.expand_glob(child, child.get("glob")):
                    items.append(InitialItem(file=rel, line=child.sourceline))
        if name is None:
            return
        if name in wf.channels:
            self.error(el, f'channel "{name}" is declared twice (lines {lines[name]} and {el.sourceline})',
                       "give each channel its own name")
            return
        lines[name] = el.sourceline
        wf.channels[name] = Channel(name=name, items=items, line=el.sourceline)

    def build_process(self, el, wf: Workflow, defaults: dict, lines: dict):
        kids = self.check_shape(el)
        name = self.name_attr(el)
        label = f'process "{name}"' if name else "this process"
        values = dict(defaults)
        for attr in PROCESS_ATTRS:
            if el.get(attr) is not None:
                value = self.process_attr(el, attr, el.get(attr))
                if value is not None:
                    values[attr] = value
        if "image" not in values and el.get("image") is None:
            self.error(el, f"{label} has no image", f"add {EXAMPLES['image']} to <process>, or set "
                       'it once for every process with <defaults image="busybox:1.36"/>')

        inputs: list[Port] = []
        outputs: list[Port] = []
        env: dict[str, str] = {}
        env_lines: dict[str, int | None] = {}
        as_lines: dict[str, int | None] = {}
        scripts = []
        for child in kids:
            self.check_shape(child)
            if child.tag in ("input", "output"):
                channel = child.get("channel")
                if channel is None:
                    continue
                as_name = child.get("as")
                if as_name is None:
                    as_name = channel
                elif not AS_RE.match(as_name) or as_name in (".", ".."):
                    self.error(child, f"as={_q(as_name)} is not a plain file name: use letters, digits, "
                                      "., _ and -, starting with a letter or digit, no /",
                               f"write {EXAMPLES['as']}")
                    continue
                if as_name in as_lines:
                    self.error(child, f"file name {_q(as_name)} is used twice in {label} (lines "
                                      f"{as_lines[as_name]} and {child.sourceline}); inputs and outputs "
                                      "share the folder /task",
                               "give one of them another name with as=\"...\"")
                    continue
                as_lines[as_name] = child.sourceline
                port = Port(channel=channel, as_name=as_name, line=child.sourceline)
                (inputs if child.tag == "input" else outputs).append(port)
            elif child.tag == "env":
                ename, evalue = child.get("name"), child.get("value")
                if ename is None or evalue is None:
                    continue
                if not ENV_RE.match(ename):
                    self.error(child, f"environment variable name {_q(ename)} is not valid: use "
                                      "letters, digits and _, not starting with a digit",
                               'write name="MY_SETTING"')
                elif ename.upper().startswith("FLOWD_"):
                    self.error(child, f"environment variable {_q(ename)} is reserved: flowd sets the "
                                      "FLOWD_ variables itself", "choose a name that does not start with FLOWD_")
                elif ename in env:
                    self.error(child, f"environment variable {_q(ename)} is set twice (lines "
                                      f"{env_lines[ename]} and {child.sourceline})", "keep one <env> per name")
                else:
                    env[ename] = evalue
                    env_lines[ename] = child.sourceline
            elif child.tag == "script":
                scripts.append(child)

        script: str | None = None
        script_file: str | None = None
        if not scripts:
            self.error(el, f"{label} has no <script>",
                       "add <script>commands</script> or <script file=\"scripts/run.sh\"/>")
        for extra in scripts[1:]:
            self.error(extra, f"{label} has a second <script> (the first is at line {scripts[0].sourceline})",
                       "a process has exactly one <script>; merge them")
        if scripts:
            s = scripts[0]
            text = s.text or ""
            if s.get("file") is not None:
                if text.strip():
                    self.error(s, "<script> has both file= and text; a script is one or the other",
                               "remove the text, or remove file=")
                else:
                    script_file = self.rel_path(s, "file", s.get("file"))
                    if script_file is not None:
                        script = self.read_script(s, script_file)
            elif not text.strip():
                self.error(s, f"the <script> of {label} is empty",
                           "write the commands inside <script>, or use <script file=\"...\"/>")
            else:
                # Inline scripts lose the indentation common to all their lines,
                # so an indented Python script inside the XML runs as written.
                script = textwrap.dedent(text)

        if name is None:
            return
        if name in wf.processes or name in lines:
            self.error(el, f'process "{name}" is declared twice (lines {lines[name]} and {el.sourceline})',
                       "give each process its own name")
            return
        lines[name] = el.sourceline
        # Added even when broken (the file is rejected then anyway), so the
        # graph checks still see its inputs and outputs and report the rest.
        wf.processes[name] = Process(
            name=name,
            image=values.get("image", ""),
            script=script or "",
            lang=values.get("lang", "sh"),
            inputs=inputs,
            outputs=outputs,
            env=env,
            retries=values.get("retries", 0),
            timeout=values.get("timeout"),
            memory=values.get("memory"),
            cpus=values.get("cpus"),
            parallel=values.get("parallel", 1),
            network=values.get("network", "none"),
            on_failure=values.get("on-failure", "stop"),
            script_file=script_file,
            line=el.sourceline,
        )

    def build_mux(self, el, wf: Workflow, name: str):
        self.check_shape(el)  # reports a missing from= or to=
        lists: dict[str, list[str]] = {}
        for attr in ("from", "to"):
            value = el.get(attr)
            if value is None:
                continue
            names = value.split()
            if not names:
                self.error(el, f"{attr}= is empty; it lists one or more channel names, separated by spaces",
                           f'write {attr}="{"counts" if attr == "from" else "to_sum to_log"}"')
                continue
            twice = _first_repeat(names)
            if twice is not None:
                self.error(el, f"{attr}= names channel {_q(twice)} twice", "name each channel once")
                continue
            lists[attr] = names
        if len(lists) == 2:
            wf.muxes.append(Mux(name=name, sources=lists["from"], targets=lists["to"], line=el.sourceline))


def _first_repeat(names: list[str]) -> str | None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


class _TooMany(Exception):
    pass


_MAGIC_RE = re.compile(r"[*?[]")


def _expand_glob(base: str, pattern: str) -> list[str]:
    """Paths under ``base`` matching ``pattern`` (relative, normalised), sorted.

    Like ``glob.glob(pattern, root_dir=base)`` (``*``, ``?``, ``[...]``; names
    starting with "." only when the pattern's part does; ``**`` is ``*``), but
    a wildcard never descends into a symbolic link to a folder, so a planted
    link loop cannot make the expansion explode, and the number of paths is
    capped. Callers still check that every match resolves inside ``base``.
    """
    parts = pattern.split("/")
    current = [""]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        magic = bool(_MAGIC_RE.search(part))
        found: list[str] = []
        for d in current:
            folder = os.path.join(base, d) if d else base
            if magic:
                try:
                    names = os.listdir(folder)
                except OSError:
                    continue
                names = [n for n in names if fnmatch.fnmatchcase(n, part)
                         and (not n.startswith(".") or part.startswith("."))]
            else:
                names = [part] if os.path.lexists(os.path.join(folder, part)) else []
            for n in names:
                rel = f"{d}/{n}" if d else n
                if not last:
                    full = os.path.join(base, rel)
                    if not os.path.isdir(full) or (magic and os.path.islink(full)):
                        continue
                found.append(rel)
                if len(found) > MAX_GLOB_MATCHES:
                    raise _TooMany()
        current = found
    return sorted(current)


def _short(tag: str, limit: int = 40) -> str:
    """An element name from the file, cut short for messages."""
    return tag if len(tag) <= limit else tag[:limit] + "…"


def _inside(real: str, base: str) -> bool:
    try:
        return os.path.commonpath([real, base]) == base
    except ValueError:
        return False


def _example_name(value: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", value)[:63].strip("_-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = ("x" + cleaned)[:63]
    return cleaned if model.NAME_RE.match(cleaned) else "my_name"


# -- rules over the whole graph ---------------------------------------------------

def _check_graph(b: _Builder, wf: Workflow) -> None:
    declared = wf.channels
    procs = list(wf.processes.values())
    muxes = wf.muxes

    mux_line = {m.name: m.line for m in muxes}

    def where(node: str) -> str:
        if node in wf.processes:
            return f'process "{node}" (line {wf.processes[node].line})'
        return f"{node} (the <mux> of line {mux_line[node]})"

    def undeclared(ch: str, line, element: str) -> bool:
        if ch in declared:
            return False
        best = _closest(ch, declared) if b.room() else None
        b.error(None, f"channel {_q(ch)} is not declared" + (f'; did you mean "{best}"?' if best else ""),
                f'declare it with <channel name="{ch}"/>' if model.NAME_RE.match(ch)
                else "name a declared channel", line=line, element=element)
        return True

    # every channel named is declared; who reads and writes what
    readers: dict[str, list[tuple[str, int | None, str]]] = {}
    writers: dict[str, list[str]] = {}
    for p in procs:
        read_here: dict[str, int | None] = {}
        for port in p.inputs:
            if undeclared(port.channel, port.line, "input"):
                continue
            if port.channel in read_here:
                b.error(None, f'process "{p.name}" reads channel "{port.channel}" twice (lines '
                              f"{read_here[port.channel]} and {port.line})",
                        "read each channel once; to get two copies, fan out with a <mux>",
                        line=port.line, element="input")
                continue
            read_here[port.channel] = port.line
            readers.setdefault(port.channel, []).append((p.name, port.line, "input"))
        written_here: dict[str, int | None] = {}
        for port in p.outputs:
            if undeclared(port.channel, port.line, "output"):
                continue
            if port.channel in read_here:
                b.error(None, f'process "{p.name}" reads and writes the same channel "{port.channel}"',
                        "write to another channel; a process cannot feed itself",
                        line=port.line, element="output")
                continue
            if port.channel in written_here:
                b.error(None, f'process "{p.name}" writes channel "{port.channel}" twice (lines '
                              f"{written_here[port.channel]} and {port.line})",
                        "keep one <output> per channel", line=port.line, element="output")
                continue
            written_here[port.channel] = port.line
            writers.setdefault(port.channel, []).append(p.name)
    for m in muxes:
        bad = {c for c in m.sources + m.targets if undeclared(c, m.line, "mux")}
        targets = set(m.targets)
        both = [c for c in m.sources if c in targets]
        if both:
            b.error(None, f'{m.name} both reads and writes channel "{both[0]}": every item would '
                          "loop back into it forever", f"remove \"{both[0]}\" from to=",
                    line=m.line, element="mux")
        for c in m.sources:
            if c not in bad and c not in both:
                readers.setdefault(c, []).append((m.name, m.line, "mux"))
        for c in m.targets:
            if c not in bad and c not in both:
                writers.setdefault(c, []).append(m.name)

    # one consumer per channel
    for ch, rs in readers.items():
        if len(rs) < 2:
            continue
        names = " and ".join(where(r[0]) for r in rs[:3])
        if len(rs) > 3:
            names = ", ".join(where(r[0]) for r in rs[:3]) + f" and {len(rs) - 3} more"
        targets = " ".join(f"{ch}_{r[0].replace('#', '')}" for r in rs[:3])
        b.error(None, f'channel "{ch}" has {len(rs)} consumers: {names}; a channel feeds exactly one '
                      "consumer (each item is taken once)",
                f'fan out with <mux from="{ch}" to="{targets}"/> and let each consumer read its own copy',
                line=rs[1][1], element=rs[1][2])

    # no cycle: nodes are processes and muxes, edges go through channels
    # (a channel with several consumers is an error already: link its first only,
    # so a hostile file cannot make writers x readers edges)
    edges: dict[str, dict[str, str]] = {}
    for ch in declared:
        if ch not in readers:
            continue
        r = readers[ch][0][0]
        for w in writers.get(ch, []):
            if w != r:
                edges.setdefault(w, {}).setdefault(r, ch)
    order = [p.name for p in procs] + [m.name for m in muxes]
    line_of = {p.name: p.line for p in procs}
    line_of.update({m.name: m.line for m in muxes})
    for cycle in _cycles(order, edges):
        steps = [f"{n} -> {edges[n][cycle[(i + 1) % len(cycle)]]}" for i, n in enumerate(cycle)]
        if len(steps) > 12:  # a long loop: show its two ends
            steps = steps[:6] + [f"... ({len(steps) - 10} more) ..."] + steps[-4:]
        text = " -> ".join(steps) + f" -> {cycle[0]}"
        first = cycle[0]
        b.error(None, f"cycle: {text}; items would go round forever, and a workflow must be a "
                      "pipeline without loops",
                "break the loop: let one of these write to a new channel instead",
                line=line_of[first], element="process" if first in wf.processes else "mux")

    # warnings
    used = set(readers) | set(writers)
    for m in muxes:
        used.update(m.sources + m.targets)
    for p in procs:
        used.update(port.channel for port in p.inputs + p.outputs)
    for ch in declared.values():
        if ch.name not in used:
            b.warn(None, f'channel "{ch.name}" is not used by any process or mux',
                   "remove it, or connect it with <input>, <output> or <mux>",
                   line=ch.line, element="channel")
    if not procs and not b.has_errors():
        b.warn(None, "the workflow has no <process>: nothing will run",
               'add a <process name="..." image="...">', line=b.root.sourceline, element="workflow")
    if wf.mode == "batch" and not b.has_errors():
        _warn_dead(b, wf, writers)


def _cycles(order: list[str], edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle per strongly connected component (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in order:
        if start in index:
            continue
        work = [(start, iter(edges.get(start, {})))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges.get(nxt, {}))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    comps.append(comp)
    rank = {n: i for i, n in enumerate(order)}
    cycles = []
    for comp in comps:
        members = set(comp)
        start = min(comp, key=lambda n: rank.get(n, len(rank)))
        # shortest way from start back to start, inside the component (BFS)
        parent: dict[str, str] = {}
        queue = [start]
        found = None
        for node in queue:
            for nxt in edges.get(node, {}):
                if nxt not in members:
                    continue
                if nxt == start:
                    found = node
                    break
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
            if found is not None:
                break
        path = [found]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append(list(reversed(path)))
    cycles.sort(key=lambda c: rank.get(c[0], 0))
    return cycles


def _warn_dead(b: _Builder, wf: Workflow, writers) -> None:
    """Batch mode: warn about processes that can never run.

    A channel is live if it has initial items or a live producer; a process
    runs once all its inputs are live; a mux passes life on from any source.
    (A worklist, linear in the size of the graph.)
    """
    waiting: dict[str, set[str]] = {}  # process -> inputs not yet live
    readers_of: dict[str, list[str]] = {}  # channel -> processes and muxes
    for p in wf.processes.values():
        waiting[p.name] = {port.channel for port in p.inputs}
        for ch in waiting[p.name]:
            readers_of.setdefault(ch, []).append(p.name)
    mux_by_name = {m.name: m for m in wf.muxes}
    for m in wf.muxes:
        for ch in m.sources:
            readers_of.setdefault(ch, []).append(m.name)
    live: set[str] = set()
    queue = [name for name, ch in wf.channels.items() if ch.items]
    live.update(queue)
    runnable = [name for name, ins in waiting.items() if not ins]

    def fire(node: str) -> None:
        outs = ([port.channel for port in wf.processes[node].outputs] if node in wf.processes
                else mux_by_name[node].targets)
        for ch in outs:
            if ch not in live:
                live.add(ch)
                queue.append(ch)

    fired: set[str] = set()
    for name in runnable:
        fired.add(name)
        fire(name)
    while queue:
        ch = queue.pop()
        for node in readers_of.get(ch, ()):
            if node in fired:
                continue
            if node in waiting:
                waiting[node].discard(ch)
                if waiting[node]:
                    continue
            fired.add(node)
            fire(node)
    for p in wf.processes.values():
        if p.name in fired:
            continue
        dead = next((port for port in p.inputs if port.channel not in live), None)
        if dead is None:
            continue
        producers = writers.get(dead.channel, [])
        if not producers:
            why = "has no producer and no initial items"
            fix = (f'add <item> elements to channel "{dead.channel}", connect a process\'s <output> '
                   'to it, or use mode="service" and push items')
        else:
            shown = ", ".join(producers[:3]) + (f" and {len(producers) - 3} more" if len(producers) > 3 else "")
            why = f"is only written by {shown}, which can never run either"
            fix = "give the first process of this chain some input"
        b.warn(None, f'process "{p.name}" can never run: its input channel "{dead.channel}" {why}',
               fix, line=dead.line, element="input")


# -- the entry point ---------------------------------------------------------------

def load_workflow(path: str | os.PathLike) -> tuple[Workflow, list[Problem]]:
    """Read and check a workflow file.

    Returns ``(workflow, warnings)``. Raises ``WorkflowError`` listing every
    problem found (errors and warnings, in file order) if the file is invalid.
    Relative ``file=`` and ``glob=`` values are resolved against the folder
    holding ``path``; ``Problem.file`` is ``path`` as given.
    """
    display = os.fsdecode(os.fspath(path))
    try:
        return _load(path, display)
    except _Fatal as fatal:
        raise WorkflowError(fatal.problems) from None
    except WorkflowError:
        raise
    except Exception as exc:  # never a traceback for a workflow file
        log.exception("internal error while reading %s", display)
        raise WorkflowError([Problem(display, None, None,
                                     f"internal error while reading the workflow: "
                                     f"{type(exc).__name__}: {exc}",
                                     "this is a bug in flowd; please report it with the file")]) from None


def _load(path, display: str) -> tuple[Workflow, list[Problem]]:
    data = _read_capped(path, display)
    _check_bytes(data, display)
    _check_prolog(data, display)
    root = _parse_xml(data, display)
    base = os.path.realpath(os.path.dirname(os.path.abspath(display)))
    b = _Builder(display, base, root)
    wf = b.build()
    _check_graph(b, wf)
    if not b.errors:
        # The schema is the formal shape; the checks above say everything it
        # would say, and more precisely. If it still objects, that's reported.
        b.errors.extend(_schema_problems(root, display))
    warnings = sorted(b.warnings, key=lambda p: p.line or 0)
    if b.dropped_warnings:
        warnings.append(Problem(display, None, None,
                                f"... and {b.dropped_warnings} more warnings not shown",
                                None, "warning"))
    if b.errors:
        problems = sorted(b.errors + b.warnings, key=lambda p: p.line or 0)
        if b.dropped_errors:
            problems.append(Problem(display, None, None,
                                    f"... and {b.dropped_errors} more errors not shown"))
        raise WorkflowError(problems)
    return wf, warnings
