"""The agent pods: listed, and watched as they come and go (with re-lists after 410 Gone).

The stand-in API server adds, readies and removes pods at the test's command; each step
waits for the watcher's next yield (bounded by a generous timeout that only turns a hang
into a failure), never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from intercept.kube.config import connect
from intercept.kube.pods import PodEndpoint, agent_pods, watch_agent_pods
from tests.kubeapi import KubeAPI

LABELS = {"app": "orders"}
SELECTOR = "app=orders"
HANG = 20.0  # seconds: only a bug waits this long


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[KubeAPI, object]]:
    with KubeAPI() as api:
        yield api, connect(api.kubeconfig(tmp_path / "kubeconfig")).api


def names(endpoints: list[PodEndpoint]) -> list[str]:
    return [e.name for e in endpoints]


# stand-in: pods with chosen ports and readiness, set directly.
def test_agent_pods_lists_the_pods_with_an_agent_with_their_readiness_and_ports(server) -> None:
    api, client = server
    api.add_pod("orders-b", LABELS, ip="10.0.0.2", ready=False, ssh_port=10022)
    api.add_pod("orders-a", LABELS, ip="10.0.0.1")
    api.add_pod("orders-plain", LABELS, agent=False)
    api.add_pod("billing-a", {"app": "billing"})
    assert agent_pods(client, "default", SELECTOR) == [
        PodEndpoint("orders-a", "default", "10.0.0.1", True, 9922, 9900),
        PodEndpoint("orders-b", "default", "10.0.0.2", False, 10022, 9900),
    ]


# stand-in: a pod Ready without an IP, which a real kubelet never reports.
def test_a_pod_without_an_address_is_not_ready(server) -> None:
    api, client = server
    api.add_pod("orders-a", LABELS, ip=None)
    [pod] = agent_pods(client, "default", SELECTOR)
    assert pod.ip is None and not pod.ready


def run_watch(client, script) -> None:
    """Run ``script(next_snapshot)`` against a live watch; ``next_snapshot()`` awaits the next yield."""

    async def main() -> None:
        async with contextlib.aclosing(watch_agent_pods(client, "default", SELECTOR)) as pods:
            async def next_snapshot() -> list[str]:
                return names(await asyncio.wait_for(anext(pods), HANG))

            await script(next_snapshot)

    asyncio.run(main())


# stand-in: pod changes one at a time, each observed.
def test_watch_yields_the_ready_agent_pods_as_they_come_and_go(server) -> None:
    api, client = server
    api.add_pod("orders-a", LABELS)

    async def script(next_snapshot) -> None:
        assert await next_snapshot() == ["orders-a"]
        await asyncio.to_thread(api.add_pod, "orders-b", LABELS, ready=False)
        await asyncio.to_thread(api.add_pod, "billing-a", {"app": "billing"})
        await asyncio.to_thread(api.add_pod, "orders-c", LABELS)
        # An unready pod and another app's pod change nothing: the next list is the one with c.
        assert await next_snapshot() == ["orders-a", "orders-c"]
        await asyncio.to_thread(api.set_pod_ready, "orders-b", True)
        assert await next_snapshot() == ["orders-a", "orders-b", "orders-c"]
        await asyncio.to_thread(api.set_pod_ready, "orders-a", False)
        assert await next_snapshot() == ["orders-b", "orders-c"]
        await asyncio.to_thread(api.remove_pod, "orders-c")
        assert await next_snapshot() == ["orders-b"]
        await asyncio.to_thread(api.remove_pod, "orders-b")
        assert await next_snapshot() == []

    run_watch(client, script)


# stand-in: a watch that answers 410 Gone on demand.
@pytest.mark.parametrize("http", [False, True], ids=["410-event", "http-410"])
def test_watch_lists_again_when_its_version_is_too_old(server, http: bool, caplog: pytest.LogCaptureFixture) -> None:
    api, client = server
    caplog.set_level(logging.INFO, logger="intercept.kube.pods")
    api.add_pod("orders-a", LABELS)

    def pod_lists() -> int:
        return sum(1 for m, p, q in api.requests if m == "GET" and p.endswith("/pods") and "watch" not in q)

    async def script(next_snapshot) -> None:
        assert await next_snapshot() == ["orders-a"]
        await asyncio.to_thread(api.add_pod, "orders-b", LABELS)
        assert await next_snapshot() == ["orders-a", "orders-b"]  # the watch is open
        assert pod_lists() == 1
        await asyncio.to_thread(api.expire_watches, http)
        await asyncio.to_thread(api.add_pod, "orders-c", LABELS)
        assert await next_snapshot() == ["orders-a", "orders-b", "orders-c"]
        # The watcher listed again, and it is still watching: later changes arrive.
        await asyncio.to_thread(api.remove_pod, "orders-a")
        assert await next_snapshot() == ["orders-b", "orders-c"]
        assert pod_lists() == 2

    run_watch(client, script)
    assert any("listing again" in r.getMessage() for r in caplog.records)
    # intercept's own log (urllib3 may warn that it retried a pooled connection the server had closed)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("intercept")], \
        "a 410 is routine, not a lost connection"
    watches = sum(1 for m, _, q in api.requests if m == "GET" and q.get("watch") == "true")
    # 410 event: the first watch ends with it, then list and watch. HTTP 410: the first watch
    # ends quietly, the second is refused with 410, then list and watch.
    assert watches == (3 if http else 2)


# stand-in: sees the server side of the watch close.
def test_cancelling_the_watching_task_ends_the_open_watch(server) -> None:
    api, client = server
    api.add_pod("orders-a", LABELS)

    async def main() -> None:
        seen: asyncio.Queue = asyncio.Queue()

        async def consume() -> None:
            async for pods in watch_agent_pods(client, "default", SELECTOR):
                await seen.put(names(pods))

        task = asyncio.create_task(consume())
        assert await asyncio.wait_for(seen.get(), HANG) == ["orders-a"]
        await asyncio.to_thread(api.add_pod, "orders-b", LABELS)
        assert await asyncio.wait_for(seen.get(), HANG) == ["orders-a", "orders-b"]
        task.cancel()  # now the watch is open, its reader blocked in a thread
        with pytest.raises(asyncio.CancelledError):
            await task

    # asyncio.run returns only once the executor's threads have finished: the blocked
    # read must end when the task is cancelled, not when the server ends the watch (300 s).
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as error:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(error)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(HANG)
    assert not runner.is_alive(), "the watch's reader thread did not stop"
    assert not errors, errors
