"""The dynamic batcher: batching rules, every future resolved or failed, drops before compute, backpressure.

Each test runs a real DynamicBatcher on a real thread pool; `run_batch` records what it was called with.
Time-based checks use short asyncio.wait timeouts to prove that nothing finishes early.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.batcher import DynamicBatcher
from server.errors import BatchError, DeadlineExpiredError, QueueFullError, ShuttingDownError


class Recorder:
    """run_batch that doubles its inputs and records batch sizes (optionally slow, optionally broken)."""

    def __init__(self, delay: float = 0.0, fail: bool = False, drop_one: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay, self.fail, self.drop_one = delay, fail, drop_one
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.threads: list[int] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.gate.wait(5)
        with self.lock:
            self.batches.append(list(items))
            self.threads.append(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom in run_batch")
        out = [2 * x for x in items]
        return out[:-1] if self.drop_one else out


class Observer:
    def __init__(self) -> None:
        self.drops: list[str] = []
        self.sizes: list[int] = []

    def queue_depth(self, depth: int) -> None:
        pass

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)

    def batch(self, size, queue_s, compute_s) -> None:
        self.sizes.append(size)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def make(recorder, observer=None, **kw):
    params = dict(max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=64, instances=1, eager_when_idle=False)
    params.update(kw)
    return DynamicBatcher(recorder, executor=ThreadPoolExecutor(params["instances"]), observer=observer, **params)


def test_concurrent_requests_form_one_full_batch_and_get_their_own_results():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=8, max_queue_delay_s=1.0)
        results = await asyncio.gather(*(b.submit(i) for i in range(8)))
        await b.close()
        return rec, results

    rec, results = run(main())
    assert [r.value for r in results] == [2 * i for i in range(8)]
    assert rec.batches == [list(range(8))]  # full batch ran at once, not after the 1 s delay
    assert all(r.batch_size == 8 for r in results)


def test_partial_batch_waits_for_the_delay_from_the_oldest_request_not_longer():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=8, max_queue_delay_s=0.2)
        start = time.monotonic()
        task = asyncio.ensure_future(asyncio.gather(b.submit(1), b.submit(2)))
        done, _ = await asyncio.wait({task}, timeout=0.1)
        assert not done, "a partial batch must not run before max_queue_delay"
        results = await task
        elapsed = time.monotonic() - start
        await b.close()
        return rec, results, elapsed

    rec, results, elapsed = run(main())
    assert rec.batches == [[1, 2]]
    assert 0.18 <= elapsed < 1.0
    assert results[0].queue_s >= 0.18


def test_eager_lone_request_on_an_idle_model_runs_without_waiting_the_delay():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=8, max_queue_delay_s=1.0, eager_when_idle=True)
        start = time.monotonic()
        result = await b.submit(7)
        elapsed = time.monotonic() - start
        await b.close()
        return result, elapsed

    result, elapsed = run(main())
    assert result.value == 14 and result.batch_size == 1
    assert elapsed < 0.5, f"an idle model must not hold a lone request for the 1 s delay (took {elapsed:.3f}s)"


def test_eager_requests_arriving_during_a_batch_gather_into_the_next_one():
    async def main():
        rec = Recorder(delay=0.2)
        b = make(rec, max_batch_size=8, max_queue_delay_s=5.0, eager_when_idle=True)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # batch [0] is computing now
        rest = asyncio.ensure_future(asyncio.gather(*(b.submit(i) for i in range(1, 6))))
        results = await asyncio.gather(first, rest)
        await b.close()
        return rec, results

    rec, (first, rest) = run(main())
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]  # the second batch ran when the instance freed, not after 5 s
    assert [r.value for r in rest] == [2, 4, 6, 8, 10]


def test_inline_lone_request_runs_on_the_event_loop_without_a_thread_hand_off():
    async def main():
        rec, obs = Recorder(), Observer()
        b = make(rec, obs, eager_when_idle=True, inline_when_idle=True)
        result = await b.submit(7)
        await b.close()
        return rec, obs, result

    rec, obs, result = run(main())
    assert result.value == 14 and result.batch_size == 1 and result.queue_s == 0.0
    assert rec.threads == [threading.get_ident()], "a lone request on an idle model must run on the event loop"
    assert obs.sizes == [1]


def test_inline_never_skips_the_delay_of_a_batcher_without_eager_dispatch():
    async def main():
        rec = Recorder()
        b = make(rec, max_queue_delay_s=0.2, eager_when_idle=False, inline_when_idle=True)
        start = time.monotonic()
        result = await b.submit(1)
        elapsed = time.monotonic() - start
        await b.close()
        return rec, result, elapsed

    rec, result, elapsed = run(main())
    assert elapsed >= 0.18 and result.queue_s >= 0.18, "--no-eager-dispatch waits the delay, inline or not"
    assert rec.threads[0] != threading.get_ident()


def test_inline_requests_arriving_together_still_batch_in_the_compute_thread():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=8, max_queue_delay_s=5.0, eager_when_idle=True, inline_when_idle=True)
        results = await asyncio.gather(*(b.submit(i) for i in range(5)))
        await b.close()
        return rec, results

    rec, results = run(main())
    assert rec.batches == [[0, 1, 2, 3, 4]], "the first request looked first and leads the batch"
    assert [r.value for r in results] == [0, 2, 4, 6, 8]
    assert rec.threads[0] != threading.get_ident()


def test_inline_failure_reaches_the_caller_and_the_batcher_keeps_working():
    async def main():
        rec = Recorder(fail=True)
        b = make(rec, eager_when_idle=True, inline_when_idle=True)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(1)
        rec.fail = False
        result = await b.submit(2)
        await b.close()
        return result

    assert run(main()).value == 4


def test_batches_never_exceed_max_batch_size():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=4, max_queue_delay_s=0.01)
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.close()
        return rec, results

    rec, results = run(main())
    assert [r.value for r in results] == [2 * i for i in range(10)]
    assert max(len(x) for x in rec.batches) <= 4
    assert sorted(sum(rec.batches, [])) == list(range(10))


def test_failing_batch_fails_every_future_in_it_and_the_batcher_keeps_working():
    async def main():
        rec = Recorder(fail=True)
        b = make(rec, max_queue_delay_s=0.01)
        outcomes = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        rec.fail = False
        after = await b.submit(5)
        await b.close()
        return outcomes, after

    outcomes, after = run(main())
    assert all(isinstance(o, RuntimeError) and "boom" in str(o) for o in outcomes)
    assert after.value == 10


def test_an_exception_in_place_of_a_result_fails_that_request_alone():
    def run_batch(items):
        return [ValueError(f"item {x} is malformed") if x < 0 else 2 * x for x in items]

    async def main():
        b = DynamicBatcher(run_batch, executor=ThreadPoolExecutor(1), max_batch_size=8, max_queue_delay_s=0.05,
                           max_queue_size=64, eager_when_idle=False)
        results = await asyncio.gather(b.submit(1), b.submit(-1), b.submit(3), return_exceptions=True)
        await b.close()
        return results

    ok1, bad, ok3 = run(main())
    assert ok1.value == 2 and ok3.value == 6 and ok1.batch_size == 3  # one batch, two answers
    assert isinstance(bad, ValueError) and "item -1" in str(bad)


def test_wrong_result_count_fails_the_batch_instead_of_misassigning_results():
    async def main():
        b = make(Recorder(drop_one=True), max_queue_delay_s=0.01)
        outcomes = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        await b.close()
        return outcomes

    assert all(isinstance(o, BatchError) for o in run(main()))


def test_full_queue_refuses_at_once():
    async def main():
        rec = Recorder()
        rec.gate.clear()  # the first batch blocks in the executor; later requests pile up in the queue
        obs = Observer()
        b = make(rec, obs, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=2)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # batch [0] is now running (blocked)
        queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        start = time.monotonic()
        with pytest.raises(QueueFullError):
            await b.submit(3)
        refused_in = time.monotonic() - start
        rec.gate.set()
        results = await asyncio.gather(first, *queued)
        await b.close()
        return refused_in, results, obs

    refused_in, results, obs = run(main())
    assert refused_in < 0.05
    assert [r.value for r in results] == [0, 2, 4]
    assert obs.drops == ["queue_full"]


def test_cancelled_while_queued_is_dropped_before_compute():
    async def main():
        rec = Recorder()
        obs = Observer()
        b = make(rec, obs, max_batch_size=8, max_queue_delay_s=0.15)
        keep = asyncio.ensure_future(b.submit(1))
        gone = asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0.02)
        gone.cancel()
        result = await keep
        await b.close()
        return rec, result, obs

    rec, result, obs = run(main())
    assert rec.batches == [[1]]
    assert result.value == 2
    assert obs.drops == ["cancelled"]


def test_deadline_passed_while_queued_fails_with_deadline_and_is_never_computed():
    async def main():
        rec = Recorder()
        obs = Observer()
        b = make(rec, obs, max_batch_size=8, max_queue_delay_s=0.1)
        late = asyncio.ensure_future(b.submit(7, deadline=time.monotonic() + 0.02))
        ok = asyncio.ensure_future(b.submit(8, deadline=time.monotonic() + 5))
        outcomes = await asyncio.gather(late, ok, return_exceptions=True)
        await b.close()
        return rec, outcomes, obs

    rec, (late, ok), obs = run(main())
    assert isinstance(late, DeadlineExpiredError)
    assert ok.value == 16
    assert rec.batches == [[8]]
    assert obs.drops == ["expired"]


def test_instances_run_batches_concurrently():
    async def main():
        rec = Recorder(delay=0.2)
        b = make(rec, max_batch_size=1, max_queue_delay_s=0.0, instances=2)
        start = time.monotonic()
        await asyncio.gather(b.submit(1), b.submit(2))
        elapsed = time.monotonic() - start
        await b.close()
        return elapsed

    assert run(main()) < 0.35  # two 0.2 s batches overlapped


def test_busy_instance_lets_the_queue_grow_into_a_bigger_next_batch():
    async def main():
        rec = Recorder(delay=0.15)
        obs = Observer()
        b = make(rec, obs, max_batch_size=16, max_queue_delay_s=0.0, instances=1)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.03)
        rest = await asyncio.gather(*(b.submit(i) for i in range(1, 6)))
        await first
        await b.close()
        return obs.sizes, rest

    sizes, rest = run(main())
    assert sizes == [1, 5]


def test_close_finishes_queued_work_without_waiting_for_the_delay_then_refuses():
    async def main():
        rec = Recorder()
        b = make(rec, max_batch_size=8, max_queue_delay_s=5.0)
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        start = time.monotonic()
        await b.close()
        closed_in = time.monotonic() - start
        results = await asyncio.gather(*pending)
        with pytest.raises(ShuttingDownError):
            await b.submit(9)
        return closed_in, results

    closed_in, results = run(main())
    assert closed_in < 1.0
    assert [r.value for r in results] == [0, 2, 4]
