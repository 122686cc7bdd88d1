"""The fence reads every spelling of a destination as the resolvers do, and dials what it judged.

Bounded here (hypothesis draws from the forms in ``tests/fence_forms.py``); the longer
campaign is ``python fuzz/fence.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intercept.routing.fence import Destination
from tests.fence_forms import as_before, disagreement, generate

# Issue 22 and what the campaign found: each reached what the rules deny, before.
FOUND_BEFORE = [
    "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "0:0:0:0:0:ffff:127.0.0.1", "0.0.0.0", "0", "::",
    "::ffff:169.254.169.254", "vault\u3002internal", "vault\uff0einternal", "vault.internal\u00ad",
    "vault\u2024internal",  # IDNA 2003 (Python's socket layer) makes the leader a dot
    "localhost\x00.example",  # glibc reads up to the NUL
    "010.0.0.1",  # octal to glibc (8.0.0.1), no address to ipaddress
    "\uff11\uff12\uff17.0.0.1", "127.0.0.1.",
]


@pytest.mark.parametrize("host", FOUND_BEFORE)
def test_known_spellings_are_read_as_the_resolvers_read_them(host):
    assert disagreement(host) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_generated_spellings_are_read_as_the_resolvers_read_them(data):
    host = generate(lambda options: data.draw(st.sampled_from(options)))
    assert disagreement(host) is None, repr(host)


@pytest.mark.parametrize("host, found", [
    ("0", "glibc via Python reads the address 0.0.0.0, the fence the name 0"),
    ("::ffff:127.0.0.1", "deny 127.0.0.0/8, ::1: allowed as written, refused as 127.0.0.1"),
    ("vault\u3002internal", "judges the name 'vault\u3002internal', which the resolver looks up as vault.internal"),
    ("localhost\x00.example", "which the resolver looks up as localhost"),
    ("[::ffff:127.0.0.1]", "allowed as written, refused as 127.0.0.1"),
])
def test_the_comparison_catches_the_fence_as_it_was(monkeypatch, host, found):
    monkeypatch.setattr(Destination, "of", classmethod(lambda cls, host: as_before(host)))
    assert found in (disagreement(host) or "")
