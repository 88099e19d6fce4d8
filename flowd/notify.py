"""systemd notifications (sd_notify), wrapped so failures are seen, not swallowed.

The ``sdnotify`` package swallows errors unless built with ``debug=True``, and
has no watchdog helper; this wrapper logs a failure once and works out the
watchdog interval from ``WATCHDOG_USEC``/``WATCHDOG_PID``. Outside systemd
(no ``NOTIFY_SOCKET``) every call does nothing. NOTIFY_SOCKET is removed from
the environment so no child process inherits it.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("flowd.notify")


class Notifier:
    def __init__(self) -> None:
        self._sock = None
        self._failed = False
        self.watchdog_interval: float | None = None
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        if usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_interval = int(usec) / 1e6 / 2
            except ValueError:
                pass
        if os.environ.get("NOTIFY_SOCKET"):
            try:
                import sdnotify

                self._sock = sdnotify.SystemdNotifier(debug=True)
                # Never block the loop: a datagram socket whose reader lags (more than
                # net.unix.max_dgram_qlen messages unread) would block a plain send.
                self._sock.socket.setblocking(False)
            except Exception as e:  # the package missing, or the socket unusable
                log.warning("cannot talk to systemd (NOTIFY_SOCKET): %s", e)
            os.environ.pop("NOTIFY_SOCKET", None)

    @property
    def active(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.notify("\n".join(lines))
        except BlockingIOError:
            log.debug("sd_notify: the manager is not reading; dropped %s", lines)
        except Exception as e:
            if not self._failed:
                log.warning("sd_notify failed: %s", e)
                self._failed = True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")
