"""The long campaign over the outbound fence's reading of destinations (the suite runs a bounded one).

    python fuzz/fence.py --inputs 1000000              # the fence as it is
    python fuzz/fence.py --inputs 100000 --as-before   # the fence as it read hosts before issue 22

Every input is a host as a client may write it (``tests/fence_forms.py``: every form of
an address that glibc's getaddrinfo/inet_aton or Python's ipaddress read, and names with
IDNA edge cases); the fence must read it as the resolvers do (or refuse it), give each of
a set of fences the verdict it gives the canonical address or name, and dial what it
judged. Disagreements are written to ``--out`` and counted; the exit status is 1 when
there is any. Needs only the package (and glibc: the resolvers are asked with
AI_NUMERICHOST, so nothing is looked up and nothing leaves the machine).
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from intercept.routing.fence import Destination  # noqa: E402
from tests.fence_forms import as_before, disagreement, generate, outcome  # noqa: E402


# the kinds of disagreement (tests/fence_forms.py words each reason so)
KINDS = {"reads the address": "a resolver reads an address the fence reads as a name or as another address",
         "judges the name": "the fence judges a name that the resolver looks up as another",
         "as written": "the verdict differs from the verdict on the canonical address or name",
         "dials": "the fence dials what it did not judge"}


class Campaign:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.inputs = 0
        self.readings: collections.Counter[str] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()  # disagreements, by their first words
        self.found = 0
        self.started = time.monotonic()

    def check(self, host: str) -> None:
        self.inputs += 1
        self.readings[outcome(host)] += 1
        reason = disagreement(host)
        if reason is not None:
            self.found += 1
            self.kinds[next((kind for words, kind in KINDS.items() if words in reason), reason)] += 1
            with self.out.open("a") as f:
                f.write(f"{reason}\t{host!r}\n")

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        readings = ", ".join(f"{k} {v}" for k, v in self.readings.most_common())
        kinds = "".join(f"\n  {v} {k}" for k, v in self.kinds.most_common())
        return (f"fence: {self.inputs} inputs in {seconds:.0f}s ({self.inputs / seconds:.0f}/s); "
                f"read as: {readings}; disagreements: {self.found}{kinds}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--as-before", action="store_true", help="read hosts as the fence did before issue 22")
    parser.add_argument("--out", type=Path, default=Path("fuzz/fence-disagreements.txt"))
    args = parser.parse_args()
    if args.as_before:
        Destination.of = classmethod(lambda cls, host: as_before(host))  # type: ignore[method-assign]
    campaign = Campaign(args.out)
    rng = random.Random(args.seed)
    try:
        for i in range(args.inputs):
            campaign.check(generate(rng.choice))
            if (i + 1) % 100_000 == 0:
                print(campaign.summary(), flush=True)
    finally:
        print(campaign.summary(), flush=True)
    return 1 if campaign.found else 0


if __name__ == "__main__":
    sys.exit(main())
