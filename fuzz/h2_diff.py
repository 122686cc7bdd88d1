"""The long campaign of the differential HTTP/2 codec test (the suite runs a bounded one).

    python fuzz/h2_diff.py --inputs 100000             # frame sequences from the grammar, seeded
    python fuzz/h2_diff.py --inputs 100000 --mutate    # the same, then a few bytes of each changed

Every input is one client connection's frames; the agent's side is played on both HTTP/2
codecs (python-hyper h2 and libnghttp2 through ngh2), frame by frame and all at once, and
what the app got and what the client got must be the same (see ``tests/h2_diff.py``).
Disagreements are written to ``--out`` and counted; the exit status is 1 when there is any.
Needs the test extra (hyperframe, hpack, ngh2).
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.h2_diff import disagreement, generate, outcome  # noqa: E402


class Campaign:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.inputs = 0
        self.frames = 0
        self.streams = 0  # streams whose request reached the app, compared on both codecs
        self.ends: collections.Counter[str] = collections.Counter()
        self.found: list[tuple[list[bytes], str]] = []
        self.started = time.monotonic()

    def check(self, frames: list[bytes]) -> None:
        self.inputs += 1
        self.frames += len(frames)
        reason = disagreement(frames)
        if reason is not None:
            self.found.append((frames, reason))
            with self.out.open("a") as f:
                f.write(f"{reason}\n\t{frames!r}\n")
            return
        seen = outcome("h2", frames)
        self.streams += sum(1 for s in seen.streams.values() if s.request is not None)
        self.ends[f"GOAWAY {seen.goaway}" if seen.closed else "open"] += 1

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        ends = ", ".join(f"{k} {v}" for k, v in self.ends.most_common(6))
        return (f"h2-diff: {self.inputs} inputs ({self.frames} frames) in {seconds:.0f}s ({self.inputs / seconds:.0f}/s); "
                f"{self.streams} requests that reached the app compared; connections ended: {ends}; "
                f"disagreements: {len(self.found)}")


def mutated(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """``frames`` with one to three bytes changed (never in the preface), then zeros after
    the last frame if a changed length says it is longer: an input that ends inside a
    frame would only show which codec reads a frame before it is whole."""
    out = list(frames)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(1, len(out))
        frame = bytearray(out[i])
        frame[rng.randrange(len(frame))] = rng.randrange(256)
        out[i] = bytes(frame)
    data = b"".join(out[1:])
    pos = 0
    while pos + 9 <= len(data):
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
    if len(data) < pos <= len(data) + (1 << 16):  # (a longer frame is refused as it begins)
        out.append(bytes(pos - len(data)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mutate", action="store_true", help="change a few bytes of each generated input")
    parser.add_argument("--out", type=Path, default=Path("fuzz/h2-disagreements.txt"))
    args = parser.parse_args()
    campaign = Campaign(args.out)
    rng = random.Random(args.seed)
    try:
        for i in range(args.inputs):
            frames = generate(rng.choice)
            campaign.check(mutated(frames, rng) if args.mutate else frames)
            if (i + 1) % 10_000 == 0:
                print(campaign.summary(), flush=True)
    finally:
        print(campaign.summary(), flush=True)
    return 1 if campaign.found else 0


if __name__ == "__main__":
    sys.exit(main())
