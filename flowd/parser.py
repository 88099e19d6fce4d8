"""Read a workflow XML file safely and translate it into a ``flowd.model.Workflow``.

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

Then the elements are translated into the model, each problem reported at
its element; the rules that need no XML live in stdlib modules: one value at
a time in ``flowd.values``, the files a workflow names in ``flowd.filerefs``,
the rules of the graph (declared channels, one consumer, no cycle, processes
that can never run) in ``flowd.rules``, which reads the line numbers the
model keeps; the bounds are in ``flowd.limits``. The shipped RelaxNG schema
(``flowd/schema/workflow.rng``) validates the shape as a backstop: its
(terser) findings are reported when the Python checks found nothing.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import stat
import textwrap
import threading
from pathlib import Path

from lxml import etree

from flowd import channelvalues, model, rules, values
from flowd.errors import Problem, WorkflowError
from flowd.filerefs import FileRefs
from flowd.limits import MAX_DEPTH, MAX_XML_BYTES
from flowd.model import Channel, InitialItem, Mux, Port, Process, Workflow
from flowd.problems import Invalid, Report, closest as _closest, quote as _q
from flowd.values import EXAMPLES, PROCESS_ATTRS, image_reference_problem  # noqa: F401

__all__ = ["load_workflow", "image_reference_problem", "SCHEMA_PATH"]

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "workflow.rng"

XINCLUDE_NAMESPACES = (
    "http://www.w3.org/2001/XInclude",
    "http://www.w3.org/2003/XInclude",
)
_ENCODING_RE = re.compile(rb"""^\s*<\?xml[^>]*?\bencoding\s*=\s*["']([^"']*)["']""")

# element -> (required attributes, optional attributes)
ATTRS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "workflow": (("name",), ("mode",)),
    "description": ((), ()),
    "defaults": ((), PROCESS_ATTRS),
    "channel": (("name",), ()),
    "item": ((), ("file",)),
    "items": (("glob",), ()),
    "process": (("name",), PROCESS_ATTRS),
    "input": (("channel",), ("as", "value")),
    "output": (("channel",), ("as", "from", "split")),
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


class _Fatal(Exception):
    """Stop here: the file cannot be read any further."""

    def __init__(self, problems: list[Problem]):
        super().__init__("fatal")
        self.problems = problems


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


class _Schema:
    """The shipped RelaxNG schema, with the lock its error log needs (one per process)."""

    def __init__(self):
        self._relaxng = etree.RelaxNG(etree.fromstring(SCHEMA_PATH.read_bytes(), _make_parser()))
        self._lock = threading.Lock()

    def errors(self, root: etree._Element) -> list | None:
        """None if ``root`` is valid, else the schema's error log entries."""
        with self._lock:
            if self._relaxng.validate(root):
                return None
            return list(self._relaxng.error_log)


@functools.lru_cache(maxsize=1)
def _relaxng() -> _Schema:
    """The schema, loaded once (a failed load is not cached: the next call tries again)."""
    return _Schema()


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
    entries = schema.errors(root)
    if entries is None:
        return []
    fix = ("compare with the workflow format (docs/format.md; installed as "
           "/usr/share/doc/flowd/format.md)")
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


# -- element shapes ------------------------------------------------------------------

class _Shape:
    """The generic checks of one element: its attributes, its children, no stray text."""

    def __init__(self, report: Report):
        self.report = report

    def error(self, el, message: str, fix: str | None = None, *, line=None, element=None):
        self.report.error(message, fix, line=el.sourceline if line is None else line,
                          element=el.tag if element is None else element)

    def check(self, el) -> list:
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
            best = _closest(local, allowed) if self.report.room() else None
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
                best = _closest(ctag, allowed_children) if self.report.room() else None
                did = f"; did you mean <{best}>?" if best else ""
                self.error(child, f"unknown element <{ctag}> inside <{tag}>{did}",
                           f"allowed inside <{tag}>: " + ", ".join(f"<{c}>" for c in allowed_children))
        return kids

    def _check_no_text(self, parent, text, at):
        if text and text.strip():
            self.error(at, f"unexpected text {_q(text.strip(), 40)} inside <{parent.tag}>",
                       "remove it; put commands in <script> and items in <item>",
                       line=at.sourceline, element=parent.tag)


# -- elements to the model --------------------------------------------------------------

class _Builder:
    """Translate the element tree into a ``Workflow``, reporting each problem at its element.

    Values are checked by ``flowd.values`` and file references by
    ``flowd.filerefs``; what they refuse is reported here, at the element.
    """

    def __init__(self, report: Report, files: FileRefs, root: etree._Element):
        self.report = report
        self.files = files
        self.root = root
        self.shape = _Shape(report)
        self.error = self.shape.error

    def checked(self, el, check, *args):
        """``check(*args)``, or None after reporting at ``el`` the rule it broke."""
        try:
            return check(*args)
        except Invalid as bad:
            self.error(el, bad.message, bad.fix)
            return None

    def check_shape(self, el) -> list:
        return self.shape.check(el)

    def name_attr(self, el, attr: str = "name") -> str | None:
        value = el.get(attr)
        return None if value is None else self.checked(el, values.name, attr, value)

    def process_attrs(self, el, into: dict) -> None:
        """The process attributes set on ``el`` (a <process> or <defaults>), into ``into``."""
        for attr in PROCESS_ATTRS:
            if el.get(attr) is not None:
                value = self.checked(el, values.process_attr, attr, el.get(attr))
                if value is not None:
                    into[attr] = value

    # the whole workflow -------------------------------------------------------
    def build(self) -> Workflow:
        root = self.root
        if root.tag != "workflow":
            q = etree.QName(root)
            tag = _short(q.localname)
            if q.namespace:
                raise _Fatal([Problem(self.report.display, root.sourceline, tag,
                                      f"the root element is in the XML namespace {_q(q.namespace)}; "
                                      "flowd files use no namespace",
                                      'remove xmlns="..." from the root element')])
            raise _Fatal([Problem(self.report.display, root.sourceline, tag,
                                  f"the root element is <{tag}>; a flowd file's root element is <workflow>",
                                  'start the file with <workflow name="...">')])
        kids = self.check_shape(root)
        wf_name = self.name_attr(root) or "workflow"
        mode = "batch"
        if root.get("mode") is not None:
            mode = self.checked(root, values.choice, "mode", root.get("mode"), model.MODES) or "batch"
        wf = Workflow(name=wf_name, mode=mode, source=self.report.display)

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
            self.process_attrs(el, defaults)

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
                    norm = self.checked(child, self.files.rel_path, "file", child.get("file"))
                    if norm is not None:
                        items.append(InitialItem(file=norm, line=child.sourceline))
                else:
                    items.append(InitialItem(text=text, line=child.sourceline))
            elif child.get("glob") is not None:
                for rel in self.checked(child, self.files.expand_glob, child.get("glob")) or []:
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
        attrs = dict(defaults)
        self.process_attrs(el, attrs)
        if "image" not in attrs and el.get("image") is None:
            self.error(el, f"{label} has no image", f"add {EXAMPLES['image']} to <process>, or set "
                       'it once for every process with <defaults image="busybox:1.36"/>')

        inputs: list[Port] = []
        outputs: list[Port] = []
        env: dict[str, str] = {}
        env_lines: dict[str, int | None] = {}
        as_lines: dict[str, int | None] = {}
        port_els: list = []  # (Port, its element)
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
                elif self.checked(child, values.as_name, as_name) is None:
                    continue
                if as_name in as_lines:
                    self.error(child, f"file name {_q(as_name)} is used twice in {label} (lines "
                                      f"{as_lines[as_name]} and {child.sourceline}); inputs and outputs "
                                      "share the folder /task",
                               "give one of them another name with as=\"...\"")
                    continue
                as_lines[as_name] = child.sourceline
                port = Port(channel=channel, as_name=as_name, line=child.sourceline)
                self.port_attrs(child, port)
                port_els.append((port, child))
                (inputs if child.tag == "input" else outputs).append(port)
            elif child.tag == "env":
                ename, evalue = child.get("name"), child.get("value")
                if ename is None or evalue is None:
                    continue
                if self.checked(child, values.env_name, ename) is None:
                    pass
                elif ename in env:
                    self.error(child, f"environment variable {_q(ename)} is set twice (lines "
                                      f"{env_lines[ename]} and {child.sourceline})", "keep one <env> per name")
                else:
                    env[ename] = evalue
                    env_lines[ename] = child.sourceline
            elif child.tag == "script":
                scripts.append(child)
        script, script_file = self.script_of(el, label, scripts)
        self.check_ports(port_els, env, label)

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
            image=attrs.get("image", ""),
            script=script or "",
            lang=attrs.get("lang", "sh"),
            inputs=inputs,
            outputs=outputs,
            env=env,
            retries=attrs.get("retries", 0),
            timeout=attrs.get("timeout"),
            memory=attrs.get("memory"),
            cpus=attrs.get("cpus"),
            parallel=attrs.get("parallel", 1),
            network=attrs.get("network", "none"),
            on_failure=attrs.get("on-failure", "stop"),
            container=attrs.get("container"),
            placement=list(attrs.get("placement", [])),
            cache=attrs.get("cache") == "yes",
            script_file=script_file,
            line=el.sourceline,
        )

    def port_attrs(self, el, port: Port) -> None:
        """value= of an <input>, from= and split= of an <output> (flowd.channelvalues)."""
        attrs = (("value", channelvalues.VALUE_CHOICES),) if el.tag == "input" else \
            (("from", channelvalues.FROM_CHOICES), ("split", channelvalues.SPLIT_CHOICES))
        for attr, options in attrs:
            if el.get(attr) is None:
                continue
            got = self.checked(el, values.choice, attr, el.get(attr), options)
            if attr == "value":
                port.value = got == "yes"
            elif attr == "from" and got is not None:
                port.source = got
            elif attr == "split" and got == "lines":
                port.split = got

    def check_ports(self, port_els: list, env: dict, label: str) -> None:
        """A value input's name is an environment variable's; one output at most takes stdout."""
        for port, el in port_els:
            if port.value:
                self.checked(el, channelvalues.value_name, port.as_name, env)
        stdout = [(p, el) for p, el in port_els if p.source == "stdout"]
        for _, extra in stdout[1:]:
            self.error(extra, f"{label} has a second output with from=\"stdout\" "
                       f"(the first is at line {stdout[0][0].line}); a script has one standard output",
                       "take stdout for one output; let the script write the others as files")

    def script_of(self, el, label: str, scripts: list) -> tuple[str | None, str | None]:
        """The text of a process's one <script> and the file it came from, if any."""
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
                    script_file = self.checked(s, self.files.rel_path, "file", s.get("file"))
                    if script_file is not None:
                        script = self.checked(s, self.files.read_script, script_file)
            elif not text.strip():
                self.error(s, f"the <script> of {label} is empty",
                           "write the commands inside <script>, or use <script file=\"...\"/>")
            else:
                # Inline scripts lose the indentation common to all their lines,
                # so an indented Python script inside the XML runs as written.
                script = textwrap.dedent(text)
        return script, script_file

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


def _short(tag: str, limit: int = 40) -> str:
    """An element name from the file, cut short for messages."""
    return tag if len(tag) <= limit else tag[:limit] + "…"


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
    report = Report(display)
    wf = _Builder(report, FileRefs(base), root).build()
    rules.check_graph(wf, report, root.sourceline)
    if not report.errors:
        # The schema is the formal shape; the checks above say everything it
        # would say, and more precisely. If it still objects, that's reported.
        report.errors.extend(_schema_problems(root, display))
    return wf, report.finish()
