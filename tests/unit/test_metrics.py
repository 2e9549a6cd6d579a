"""`Metrics`' process figures: memory, file descriptors, OS threads and the event loop's tasks."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from visionserve.metrics import EventLoopCollector, Metrics, os_threads

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="process figures need /proc")


def _samples(metrics: Metrics) -> dict[str, float]:
    body, _ = metrics.render()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if not sample.labels
    }


def test_the_process_figures_are_in_the_services_own_registry() -> None:
    samples = _samples(Metrics())
    me = psutil.Process()
    rss = me.memory_info().rss
    assert abs(samples["process_resident_memory_bytes"] - rss) < 0.2 * rss
    assert samples["process_open_fds"] == pytest.approx(me.num_fds(), abs=3)
    assert samples["process_max_fds"] > 0
    assert samples["process_start_time_seconds"] == pytest.approx(me.create_time(), abs=2)
    assert "visionserve_event_loop_tasks" not in samples  # no loop watched yet


def test_the_thread_gauge_counts_os_threads_when_scraped() -> None:
    metrics = Metrics()
    before = _samples(metrics)["process_threads"]
    assert before == os_threads() == psutil.Process().num_threads()
    release = threading.Event()
    workers = [threading.Thread(target=release.wait) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        assert _samples(metrics)["process_threads"] == before + 3
    finally:
        release.set()
        for worker in workers:
            worker.join()
    assert _samples(metrics)["process_threads"] == before


def test_event_loop_tasks_are_counted_on_the_loop_and_from_another_thread() -> None:
    metrics = Metrics()

    async def main() -> tuple[float, float, float]:
        metrics.watch_event_loop(asyncio.get_running_loop())
        idle = _samples(metrics)["visionserve_event_loop_tasks"]  # main() itself
        blockers = [asyncio.create_task(asyncio.sleep(60)) for _ in range(5)]
        await asyncio.sleep(0)
        on_loop = _samples(metrics)["visionserve_event_loop_tasks"]
        # the gRPC process scrapes from its metrics server's thread while the loop runs
        with ThreadPoolExecutor(1) as pool:
            from_thread = await asyncio.wrap_future(pool.submit(lambda: _samples(metrics)))
        for task in blockers:
            task.cancel()
        await asyncio.gather(*blockers, return_exceptions=True)
        return idle, on_loop, from_thread["visionserve_event_loop_tasks"]

    idle, on_loop, from_thread = asyncio.run(main())
    assert idle == 1
    assert on_loop == from_thread == 6


def test_a_loop_that_does_not_answer_gets_its_last_count_after_the_timeout() -> None:
    collector = EventLoopCollector(timeout_s=0.05)
    loop = asyncio.new_event_loop()
    try:
        collector.loop = loop
        assert collector.count() is None  # the loop does not run: nothing counted yet
        loop.run_until_complete(asyncio.sleep(0.01))  # runs the queued count: 1 task, the sleep
        assert collector.count() == 1  # not running again: the last count, after the timeout
    finally:
        loop.close()
    assert collector.count() is None  # closed: no figure at all
