"""``flowd [--config FILE] [--spool DIR] [--socket PATH]``: run the daemon in the foreground."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import KEYS, toml_value, load
from .errors import FlowError
from .textsafe import LogFormatter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="flowd",
        description="Run the flowd daemon in the foreground; it logs to stderr.",
    )
    ap.add_argument("--config", help="TOML config file (default /etc/flowd/flowd.toml, if present)")
    ap.add_argument("--spool", help="spool folder (overrides the config)")
    ap.add_argument("--socket", help="control socket path (overrides the config)")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--print-config", action="store_true", help="print every config key and exit")
    ap.add_argument("--version", action="version", version=f"flowd {__version__}")
    args = ap.parse_args(argv)
    if args.print_config:
        for key, (default, text) in KEYS.items():
            print(f"# {text}\n{key} = {toml_value(default)}\n")
        return 0
    try:
        cfg = load(args.config, required=args.config is not None)
        if args.spool:
            cfg.spool = args.spool
        if args.socket:
            cfg.socket = args.socket
        if args.log_level:
            cfg.log_level = args.log_level
        handler = logging.StreamHandler(sys.stderr)
        # every record one line, control characters escaped (flowd.textsafe)
        handler.setFormatter(LogFormatter("%(asctime)s flowd[%(process)d] %(levelname)s %(message)s"))
        logging.basicConfig(level=getattr(logging, cfg.log_level.upper()), handlers=[handler])
        from .daemon import Daemon

        return Daemon(cfg).serve()
    except FlowError as e:
        print(f"flowd: {e}", file=sys.stderr)
        return e.exit_status if e.exit_status != 1 else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
