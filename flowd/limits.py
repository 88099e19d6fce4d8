"""The bounds on a workflow file and what it names (stdlib only).

One place for every number the workflow checks enforce, so the reading of
the XML (``flowd.parser``), the rules on the model (``flowd.rules``) and the
checks of the files a workflow names (``flowd.filerefs``) agree.
"""
from __future__ import annotations

MAX_XML_BYTES = 1024 * 1024  # a workflow file is at most 1 MiB
MAX_SCRIPT_BYTES = 1024 * 1024  # and so is a script given by file=
MAX_DEPTH = 64  # levels of nested elements (the format needs 3)
MAX_PROBLEMS = 200  # report at most this many, then say how many more
MAX_COUNT = 1_000_000  # upper bound of retries= and parallel=
MAX_GLOBS = 256  # <items glob=...> per file (each one reads a folder)
MAX_GLOB_MATCHES = 100_000  # paths one glob may match
MIN_MEMORY = 6 * 1024 * 1024  # Docker refuses a memory limit below 6 MiB
IMAGE_NAME_MAX = 255  # characters in an image reference (Docker bounds the name)
