"""Which way this machine gives COMMAND the cluster's names, and why (``intercept doctor`` says it too).

- ``hosts-file``: the hosts file is writable (root, or a CDE container): a managed block in
  it (:mod:`intercept.access.guard`), for every process of the machine, removed at the end.
- ``namespace``: Linux without root, where user namespaces are allowed: COMMAND alone sees
  a hosts file of its own (:mod:`intercept.access.isolate`).
- ``proxy``: neither (macOS, Windows, Linux with user namespaces off): the proxy variables
  and ``--forward`` only, as before.
- ``off``: asked for (``--access off``).

In the first two, a loopback address per Service (127.77.0.0/16, blocks of it leased per
session: :mod:`intercept.access.leases`) listens on its ports;
Linux routes the whole 127/8 to ``lo``, so no root is needed for that, except for ports
below 1024 (said per Service when they cannot be bound).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from intercept.access import isolate
from intercept.access.guard import HOSTS
from intercept.errors import UsageError

CHOICES = ("auto", "hosts-file", "namespace", "proxy", "off")


@dataclass(frozen=True)
class Mode:
    name: str  # one of CHOICES but auto
    why: str

    @property
    def names(self) -> bool:
        """Whether COMMAND resolves the cluster's names in this mode."""
        return self.name in ("hosts-file", "namespace")


def choose(requested: str = "auto", hosts: Path = HOSTS) -> Mode:
    """The mode for ``requested`` (one of :data:`CHOICES`) on this machine; UsageError when an
    explicit one cannot work here, saying why and what would."""
    if requested not in CHOICES:
        raise UsageError(f"--access {requested}: expected one of {', '.join(CHOICES)}")
    if requested == "off":
        return Mode("off", "--access off: COMMAND gets the proxy variables and --forward only")
    if requested == "proxy":
        return Mode("proxy", "--access proxy: COMMAND gets the proxy variables and --forward only")
    writable = sys.platform == "linux" and os.access(hosts, os.W_OK)
    if requested in ("auto", "hosts-file") and writable:
        who = "root" if os.geteuid() == 0 else "this user"
        return Mode("hosts-file", f"{hosts} is writable by {who}: a managed block in it, removed when you leave "
                                  "(every process of this machine resolves the cluster's names meanwhile)")
    if requested == "hosts-file":
        raise UsageError(f"--access hosts-file: {hosts} is not writable here; run as root, or use --access namespace "
                         "(Linux, no root)")
    why_not = isolate.available()
    if why_not is None:
        why = "--access namespace" if requested == "namespace" else \
            f"{hosts} is not writable, and user namespaces are available"
        return Mode("namespace", f"{why}: COMMAND runs with a hosts file of its own (other processes see nothing)")
    if requested == "namespace":
        raise UsageError(f"--access namespace: {why_not}; run as root (--access hosts-file), or use --forward")
    if sys.platform == "linux":
        return Mode("proxy", f"{hosts} is not writable and {why_not}: COMMAND gets the proxy variables and --forward "
                             "only; run as root for the cluster's names")
    return Mode("proxy", f"on {sys.platform} the cluster's names need a writable {hosts} (not built yet): COMMAND "
                         "gets the proxy variables and --forward only")


__all__ = ["CHOICES", "Mode", "choose"]
