"""The managed block in a hosts file (root mode), sans-IO: bytes in, bytes out.

A block is one run of whole lines appended at the end of the file::

    # >>> intercept 4242: the cluster's Services until this intercept ends >>>
    127.77.0.1 redis redis.shop redis.shop.svc redis.shop.svc.cluster.local
    # <<< intercept 4242 <<<

``4242`` is the owner (the process that holds the block; its guard removes it when that
process dies, even by ``kill -9``). When the file did not end with a newline, the block
begins with one, and its first line says so (``+newline``), so that :func:`remove` gives
back the file byte for byte as it was, whatever was added before or after the block
meanwhile. Several owners' blocks can coexist; each is found by its own markers.
"""

from __future__ import annotations

import re

_BEGIN = "# >>> intercept {owner}: the cluster's Services until this intercept ends{nl} >>>\n"
_END = "# <<< intercept {owner} <<<\n"
_NL = " +newline"
_OWNER = re.compile(rb"^# >>> intercept (\S+): ", re.M)


def _markers(owner: str) -> tuple[bytes, bytes, bytes]:
    if not owner or any(c.isspace() for c in owner):
        raise ValueError(f"a block's owner is one word, not {owner!r}")
    return (_BEGIN.format(owner=owner, nl="").encode(), _BEGIN.format(owner=owner, nl=_NL).encode(),
            _END.format(owner=owner).encode())


def _find(text: bytes, owner: str) -> tuple[int, int, bool] | None:
    """(start, end, added a newline) of ``owner``'s block, or None."""
    plain, with_nl, end_marker = _markers(owner)
    for marker, added in ((plain, False), (with_nl, True)):
        start = 0 if text.startswith(marker) else (i + 1 if (i := text.find(b"\n" + marker)) >= 0 else -1)
        if start < 0:
            continue
        end = text.find(end_marker, start)
        if end < 0 or (end > 0 and text[end - 1:end] != b"\n"):
            raise ValueError(f"the hosts block of intercept {owner} has no end line; remove its lines by hand")
        end += len(end_marker)
        if added and start > 0 and text[start - 1:start] == b"\n" and end == len(text):
            start -= 1  # the newline it added, unless lines were added after the block since
        else:
            added = False
        return start, end, added
    return None


def owners(text: bytes) -> list[str]:
    """The owners of every block in ``text``, in order."""
    return [m.group(1).decode("ascii", "replace") for m in _OWNER.finditer(text)]


def put(text: bytes, owner: str, lines: str) -> bytes:
    """``text`` with ``owner``'s block holding ``lines`` (each ending in a newline): the
    block replaced where it is, or appended."""
    plain, with_nl, end_marker = _markers(owner)
    body = lines.encode("ascii")
    if body and not body.endswith(b"\n"):
        body += b"\n"
    found = _find(text, owner)
    if found is not None:
        start, end, added = found
        return text[:start] + (b"\n" + with_nl if added else plain) + body + end_marker + text[end:]
    if text and not text.endswith(b"\n"):
        return text + b"\n" + with_nl + body + end_marker
    return text + plain + body + end_marker


def remove(text: bytes, owner: str) -> bytes:
    """``text`` without ``owner``'s block (and the newline it added); unchanged if it has none."""
    found = _find(text, owner)
    if found is None:
        return text
    start, end, _ = found
    return text[:start] + text[end:]


__all__ = ["owners", "put", "remove"]
