"""The fuzz run: the crafted corpus, then n generated cases, over both APIs (unary and ClassifyStream), with
known-good requests interleaved whose answers must never change.

What counts:
- wrong code: the status is not in the case's oracle;
- crash: INTERNAL or UNKNOWN (an unhandled exception reached gRPC), or the server process died;
- message problem: an error without a message, or INVALID_ARGUMENT whose message does not name the field;
- lost valid request: an interleaved good request not answered OK with its baseline answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import grpc

from benchmarks.robustness import corpus
from benchmarks.robustness.client import CHANNEL_OPTIONS, Caller, Outcome, message_problem, same_answer
from benchmarks.robustness.corpus import Case

CRASH_CODES = ("INTERNAL", "UNKNOWN")
STREAM_CHUNK = 25


@dataclass
class ClassStats:
    tried: int = 0
    malformed: int = 0
    wrong_code: int = 0
    crashes: int = 0
    message_problems: int = 0
    codes: dict[str, int] = field(default_factory=dict)


@dataclass
class FuzzResult:
    """Counts by class and the acceptance figures."""

    by_class: dict[str, ClassStats] = field(default_factory=dict)
    by_api: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[dict] = field(default_factory=list)  # the first failures, for the report
    valid_sent: int = 0
    valid_lost: int = 0
    server_alive: bool = True
    duration_s: float = 0.0

    @property
    def tried(self) -> int:
        return sum(s.tried for s in self.by_class.values())

    @property
    def malformed(self) -> int:
        return sum(s.malformed for s in self.by_class.values())

    @property
    def wrong_codes(self) -> int:
        return sum(s.wrong_code for s in self.by_class.values())

    @property
    def crashes(self) -> int:
        return sum(s.crashes for s in self.by_class.values()) + (0 if self.server_alive else 1)

    @property
    def message_problems(self) -> int:
        return sum(s.message_problems for s in self.by_class.values())

    @property
    def passed(self) -> bool:
        return not (self.wrong_codes or self.crashes or self.message_problems or self.valid_lost) and \
            self.server_alive

    def summary(self) -> dict:
        return {"tried": self.tried, "malformed": self.malformed, "wrong_codes": self.wrong_codes,
                "crashes": self.crashes, "message_problems": self.message_problems, "valid_sent": self.valid_sent,
                "valid_lost": self.valid_lost, "server_alive": self.server_alive, "by_api": dict(self.by_api),
                "duration_s": round(self.duration_s, 2), "passed": self.passed}

    def to_dict(self) -> dict:
        classes = {k: asdict(v) for k, v in sorted(self.by_class.items())}
        return {**self.summary(), "by_class": classes, "examples": self.examples}

    def record(self, case: Case, outcome: Outcome, baseline: dict[str, Outcome]) -> None:
        stats = self.by_class.setdefault(case.cls, ClassStats())
        stats.tried += 1
        stats.malformed += case.malformed
        stats.codes[outcome.code] = stats.codes.get(outcome.code, 0) + 1
        self.by_api[case.api] += 1
        problem = None
        if outcome.code not in case.expect:
            stats.wrong_code += 1
            problem = f"got {outcome.code}, expected {sorted(case.expect)}"
        if outcome.code in CRASH_CODES:
            stats.crashes += 1
        if (why := message_problem(outcome)) is not None:
            stats.message_problems += 1
            problem = problem or why
        if case.cls.startswith("valid_interleaved"):
            self.valid_sent += 1
            ref = baseline.get(f"{case.cls}/{case.api}")
            if outcome.code != "OK" or ref is None or not same_answer(outcome, ref):
                self.valid_lost += 1
                problem = problem or "interleaved valid request answered differently from its baseline"
        if problem and len(self.examples) < 25:
            self.examples.append({"class": case.cls, "api": case.api, "problem": problem, "code": outcome.code,
                                  "message": outcome.message[:300]})


def plan(model: str, requests: int, seed: int, probe_every: int, limits: dict[str, int]
         ) -> tuple[list[Case], list[list[Case]]]:
    """Unary cases and ClassifyStream chunks: the crafted corpus, n generated cases, probes every few cases.

    Every tenth generated mmkd case goes through ClassifyStream instead of Classify."""
    unary: list[Case] = []
    streamed: list[Case] = []
    cases = corpus.crafted(model, **limits) + list(corpus.generate(model, requests, seed, limits["max_text_chars"]))
    for i, case in enumerate(cases):
        (streamed if case.api == "mmkd" and i % 20 == 0 else unary).append(case)
        if i % probe_every == 0:
            probe = corpus.valid_probe(model, i // probe_every)
            (streamed if probe.api == "mmkd" and (i // probe_every) % 10 == 0 else unary).append(probe)
    chunks = [streamed[i:i + STREAM_CHUNK] for i in range(0, len(streamed), STREAM_CHUNK)]
    return unary, chunks


async def run_fuzz(address: str, model: str, *, requests: int = 10_000, seed: int = 0, concurrency: int = 8,
                   probe_every: int = 10, limits: dict[str, int] | None = None, timeout_s: float = 30.0,
                   alive: Callable[[], bool] = lambda: True, credentials: grpc.ChannelCredentials | None = None,
                   metadata: tuple[tuple[str, str], ...] = (),
                   progress: Callable[[int], None] | None = None) -> FuzzResult:
    """Fuzz a running server at `address`; `alive` says whether its process still runs.

    `limits` are the server's max_text_chars, max_image_bytes and max_message_bytes (defaults: the server's)."""
    limits = {"max_text_chars": corpus.MAX_TEXT_CHARS, "max_image_bytes": corpus.MAX_IMAGE_BYTES,
              "max_message_bytes": corpus.MAX_MESSAGE_BYTES, **(limits or {})}
    unary, chunks = plan(model, requests, seed, probe_every, limits)
    result = FuzzResult()
    start = time.monotonic()
    channel = (grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS) if credentials
               else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
    async with channel:
        caller = Caller(channel, metadata)
        baseline = {}
        for i in range(4):  # valid_probe cycles through four (request, api) pairs
            probe = corpus.valid_probe(model, i)
            baseline[f"{probe.cls}/{probe.api}"] = await caller.call(probe, timeout_s)
        jobs: asyncio.Queue = asyncio.Queue()
        for chunk in chunks:
            jobs.put_nowait(("stream", chunk))
        for case in unary:
            jobs.put_nowait(("unary", case))
        done = 0

        async def worker() -> None:
            nonlocal done
            while not jobs.empty():
                kind, item = jobs.get_nowait()
                if kind == "stream":
                    outcomes = await caller.stream(item, timeout_s * 2)
                    for case, outcome in zip(item, outcomes):
                        result.record(case, outcome, baseline)
                    for case in item[len(outcomes):]:
                        result.record(case, Outcome("NO_ANSWER", "stream ended without an answer", 0.0), baseline)
                    done += len(item)
                else:
                    result.record(item, await caller.call(item, timeout_s), baseline)
                    done += 1
                if progress is not None and done % 1000 < (len(item) if kind == "stream" else 1):
                    progress(done)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.server_alive = alive()
    result.duration_s = time.monotonic() - start
    return result
