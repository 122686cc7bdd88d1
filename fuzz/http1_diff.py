"""The long campaign of the differential HTTP/1.1 framing test (the suite runs a bounded one).

    python fuzz/http1_diff.py --inputs 1000000            # from the grammar, seeded
    python fuzz/http1_diff.py --atheris --inputs 1000000  # atheris mutates raw bytes, coverage-guided

Every input is framed by the agent, by h11 and by llhttp (httptools); the agent must
reject it or frame every message it accepts as each reference does (see
``tests/http1_diff.py``). Disagreements are written to ``--out`` and counted; the exit
status is 1 when there is any. Needs the test extra (h11, httptools) and, for
``--atheris``, ``pip install atheris``.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.http1_diff import agent_frames, disagreement, generate  # noqa: E402


class Campaign:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.inputs = 0
        self.messages = 0  # messages the agent accepted, each compared with both references
        self.stops: collections.Counter[str] = collections.Counter()
        self.found: list[tuple[bytes, str]] = []
        self.started = time.monotonic()

    def check(self, data: bytes) -> None:
        self.inputs += 1
        messages, stop, _ = agent_frames(data)
        self.messages += len(messages)
        self.stops[stop] += 1
        reason = disagreement(data)
        if reason is not None:
            self.found.append((data, reason))
            with self.out.open("a") as f:
                f.write(f"{reason}\t{data!r}\n")

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        stops = ", ".join(f"{k} {v}" for k, v in self.stops.most_common())
        return (
            f"http1-diff: {self.inputs} inputs in {seconds:.0f}s ({self.inputs / seconds:.0f}/s); "
            f"{self.messages} accepted messages compared with h11 and llhttp; agent stops: {stops}; "
            f"disagreements: {len(self.found)}"
        )


def run_grammar(campaign: Campaign, inputs: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(inputs):
        campaign.check(generate(rng.choice))
        if (i + 1) % 100_000 == 0:
            print(campaign.summary(), flush=True)


def run_atheris(campaign: Campaign, inputs: int, seed: int, corpus: Path) -> None:
    import atheris  # noqa: PLC0415 (optional: only this mode needs it)

    atheris.instrument_all()  # coverage of the agent's parser and of h11 guides the mutations
    corpus.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(200):  # grammar-built seeds: atheris mutates from valid-looking requests
        (corpus / f"seed-{i}").write_bytes(generate(rng.choice))

    def check(data: bytes) -> None:
        campaign.check(data)
        if campaign.inputs % 100_000 == 0 or campaign.inputs >= inputs:
            print(campaign.summary(), flush=True)
        if campaign.inputs >= inputs:  # libFuzzer ends the process itself: end it here, with our status
            os._exit(1 if campaign.found else 0)

    atheris.Setup([sys.argv[0], f"-runs={inputs + 1}", f"-seed={seed}", "-max_len=512", str(corpus)], check)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided mutation of raw bytes")
    parser.add_argument("--corpus", type=Path, default=Path("fuzz/corpus"))
    parser.add_argument("--out", type=Path, default=Path("fuzz/disagreements.txt"))
    args = parser.parse_args()
    campaign = Campaign(args.out)
    try:
        if args.atheris:
            run_atheris(campaign, args.inputs, args.seed, args.corpus)
        else:
            run_grammar(campaign, args.inputs, args.seed)
    finally:
        print(campaign.summary(), flush=True)
    return 1 if campaign.found else 0


if __name__ == "__main__":
    sys.exit(main())
