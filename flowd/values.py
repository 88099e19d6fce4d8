"""The rules for one attribute value of a workflow file (stdlib only).

Each check takes the text as written and returns the value flowd uses, or
raises ``flowd.problems.Invalid`` with the message and the fix; the XML
translation (``flowd.parser``) reports it at the element it came from.
"""
from __future__ import annotations

import math
import re

from flowd import model, units
from flowd.limits import IMAGE_NAME_MAX, MAX_COUNT, MIN_MEMORY
from flowd.problems import Invalid, closest, quote

AS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
COUNT_RE = re.compile(r"^[0-9]+$")
DECIMAL_RE = re.compile(r"^(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")

# Docker's image reference grammar (github.com/distribution/reference):
#   reference := name [":" tag] ["@" digest]
#   name      := [domain "/"] path-component ["/" path-component]*     (at most 255)
#   domain    := host [":" port]; host := domain-name   (flowd takes no "[IPv6]" host:
#                the schema's character set has no brackets)
#   path-component := [a-z0-9]+ (separator [a-z0-9]+)*, separator := . | _ | __ | -+
#   tag       := [\w][\w.-]{0,127}
#   digest    := algorithm ":" hex; algorithm := [A-Za-z][A-Za-z0-9]* ([+._-][A-Za-z][A-Za-z0-9]*)*
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IMAGE_HOST_RE = re.compile(rf"^{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?$")
_IMAGE_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_IMAGE_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_IMAGE_ALGORITHM_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[+._-][A-Za-z][A-Za-z0-9]*)*$")
_IMAGE_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}  # what Docker can check
_IMAGE_ID_RE = re.compile(r"^[a-f0-9]{64}$")

PROCESS_ATTRS = (
    "image", "lang", "retries", "timeout", "memory", "cpus", "parallel",
    "network", "on-failure", "container", "placement", "cache",
)

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
    "container": 'container="warm"',
    "placement": 'placement="node.labels.disk==ssd"',
    "cache": 'cache="yes"',
    "mode": 'mode="service"',
    "as": 'as="input.txt"',
    "value": 'value="yes"',
    "from": 'from="stdout"',
    "split": 'split="lines"',
}

_q = quote


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


def image_suggestion(ref: str) -> str:
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


def example_name(value: str) -> str:
    """A valid name close to ``value``, for a fix hint."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", value)[:63].strip("_-")
    if not cleaned or not cleaned[0].isalpha():
        cleaned = ("x" + cleaned)[:63]
    return cleaned if model.NAME_RE.match(cleaned) else "my_name"


def name(attr: str, value: str) -> str:
    """A workflow, channel or process name."""
    if not model.NAME_RE.match(value):
        raise Invalid(f"{attr} {_q(value)} is not a valid name: names start with a letter, "
                      "then letters, digits, _ or -, at most 63 characters",
                      f'write {attr}="{example_name(value)}"')
    return value


def choice(attr: str, value: str, options) -> str:
    v = value.strip()
    if v in options:
        return v
    best = closest(v, options)
    raise Invalid(f"attribute {_q(attr)} is {_q(value)}; it must be one of " + ", ".join(options)
                  + (f"; did you mean {_q(best)}?" if best else ""),
                  f"write {attr}={_q(best)}" if best
                  else f"write {EXAMPLES.get(attr, attr + '=' + _q(options[0]))}")


def count(attr: str, value: str, minimum: int) -> int:
    v = value.strip()
    number = int(v) if COUNT_RE.match(v) and len(v) <= 12 else None
    if number is not None and minimum <= number <= MAX_COUNT:
        return number
    if number is None and COUNT_RE.match(v) or (number is not None and number > MAX_COUNT):
        what = f"a whole number from {minimum} to {MAX_COUNT}"
    else:
        what = f"a whole number {minimum} or more"
    raise Invalid(f"attribute {_q(attr)} is {_q(value)}; it must be {what}", f"write {EXAMPLES[attr]}")


def process_attr(attr: str, value: str):
    """Parse one process attribute (also used for <defaults>)."""
    if attr == "image":
        why = image_reference_problem(value)
        if why is None:
            return value
        raise Invalid(f"attribute \"image\" is {_q(value)}; it is not a Docker image reference: {why}",
                      image_suggestion(value))
    if attr == "lang":
        return choice(attr, value, model.LANGS)
    if attr == "network":
        return choice(attr, value, model.NETWORKS)
    if attr == "on-failure":
        return choice(attr, value, model.ON_FAILURE)
    if attr == "container":
        return choice(attr, value, model.CONTAINERS)
    if attr == "placement":
        return placement(value)
    if attr == "cache":
        return choice(attr, value, model.CACHE_CHOICES)
    if attr == "retries":
        return count(attr, value, 0)
    if attr == "parallel":
        return count(attr, value, 1)
    if attr == "timeout":
        try:
            seconds = units.parse_duration(value)
            if not math.isfinite(seconds):
                raise ValueError
            return seconds
        except (ValueError, OverflowError):
            raise Invalid(f"attribute \"timeout\" is {_q(value)}; it must be a duration "
                          "more than zero such as 90s, 5m, 2h or 250ms",
                          f"write {EXAMPLES['timeout']}") from None
    if attr == "memory":
        try:
            size = units.parse_size(value)
        except (ValueError, OverflowError):
            raise Invalid(f"attribute \"memory\" is {_q(value)}; it must be a size such as "
                          "256m, 1g or 512MiB", f"write {EXAMPLES['memory']}") from None
        if size < MIN_MEMORY:
            raise Invalid(f"attribute \"memory\" is {_q(value)} ({size} bytes); Docker refuses "
                          "a memory limit below 6 MiB", f"write {EXAMPLES['memory']}")
        return size
    if attr == "cpus":
        v = value.strip()
        if DECIMAL_RE.match(v) and len(v) <= 20:
            cpus = float(v)
            if cpus > 0 and math.isfinite(cpus):
                return cpus
        raise Invalid(f"attribute \"cpus\" is {_q(value)}; it must be a decimal number "
                      "more than zero, such as 0.5 or 2", f"write {EXAMPLES['cpus']}")
    raise AssertionError(attr)  # pragma: no cover


# Swarm placement constraints (swarmkit's manager/constraint: the keys it knows,
# == or !=, and its value pattern), checked here so a typo is a submission
# error with a line number rather than a job the manager refuses.
_PLACEMENT_KEY_RE = re.compile(
    r"^(?:node\.(?:id|hostname|ip|role|platform\.os|platform\.arch)"
    r"|(?:node|engine)\.labels\.[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")
_PLACEMENT_VALUE_RE = re.compile(r"^[A-Za-z0-9:_.*()?+\[\]\\^$|/ -]{1,255}$")
MAX_PLACEMENT = 16  # constraints on one process


def placement(value: str) -> list[str]:
    """``process@placement``: Swarm constraints separated by ``;``."""
    parts = [c.strip() for c in value.split(";") if c.strip()]
    if not parts:
        raise Invalid("attribute \"placement\" is empty; it holds Swarm constraints such as "
                      "node.labels.disk==ssd, separated by ;",
                      f"write {EXAMPLES['placement']}, or leave placement out")
    if len(parts) > MAX_PLACEMENT:
        raise Invalid(f"attribute \"placement\" has {len(parts)} constraints; at most "
                      f"{MAX_PLACEMENT} are allowed", "keep the ones that matter")
    for c in parts:
        m = re.match(r"^(.*?)(==|!=)(.*)$", c)
        key, value_ = (m.group(1).strip(), m.group(3).strip()) if m else ("", "")
        if m is None or not _PLACEMENT_KEY_RE.match(key):
            raise Invalid(f"placement constraint {_q(c)} is not KEY==VALUE or KEY!=VALUE with a key "
                          "Swarm knows (node.id, node.hostname, node.ip, node.role, node.platform.os, "
                          "node.platform.arch, node.labels.NAME, engine.labels.NAME)",
                          f"write {EXAMPLES['placement']}")
        if not _PLACEMENT_VALUE_RE.match(value_):
            raise Invalid(f"placement constraint {_q(c)} has a value Swarm refuses: use letters, "
                          "digits and : _ . * - / (at most 255 characters)",
                          f"write {EXAMPLES['placement']}")
    return [re.sub(r"\s*(==|!=)\s*", r"\1", c) for c in parts]


def as_name(value: str) -> str:
    """The file name in /task of an <input> or <output>."""
    if not AS_RE.match(value) or value in (".", ".."):
        raise Invalid(f"as={_q(value)} is not a plain file name: use letters, digits, "
                      "., _ and -, starting with a letter or digit, no /",
                      f"write {EXAMPLES['as']}")
    return value


def env_name(value: str) -> str:
    """The name of an <env> variable."""
    if not ENV_RE.match(value):
        raise Invalid(f"environment variable name {_q(value)} is not valid: use "
                      "letters, digits and _, not starting with a digit",
                      'write name="MY_SETTING"')
    if value.upper().startswith("FLOWD_"):
        raise Invalid(f"environment variable {_q(value)} is reserved: flowd sets the "
                      "FLOWD_ variables itself", "choose a name that does not start with FLOWD_")
    return value
