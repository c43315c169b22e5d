"""service/coordinator.py, the supervisor's side of a reload, driven by hand: who takes part, when all
switch, when none does, and what a starting worker is told."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass, field

import pytest

from service.coordinator import Coordinator
from service.modelset import Decision, ReloadError


@dataclass
class FakeWorker:
    pid: int
    ready: bool = False
    generation: int = 0
    held: int | None = None
    committing: int | None = None
    sent: list = field(default_factory=list)

    def send(self, message: tuple) -> None:
        self.sent.append(message)

    def kinds(self) -> list:
        return [(m[0], m[1].generation if m[0] == "prepare" else m[1]) for m in self.sent]


class FakeLifecycle:
    """Decides generation 1, 2, ... at once; `refuse` makes the next decision fail."""

    def __init__(self):
        self.current, self.decided, self.refuse = None, 0, None

    def decide(self, strict: bool) -> Decision:
        if self.refuse:
            raise ReloadError("cgan", self.refuse)
        self.decided += 1
        return Decision(self.decided, "{}", {}, {})

    def commit(self, decision: Decision) -> None:
        self.current = decision


@pytest.fixture
def started():
    """A coordinator serving generation 1 on two workers."""
    coordinator = Coordinator(FakeLifecycle())
    coordinator.start()
    workers = [FakeWorker(pid) for pid in (11, 12)]
    for worker in workers:
        coordinator.received(worker, ("prepared", 1, None), workers)
        assert worker.kinds() == [("commit", 1)]
        coordinator.received(worker, ("serving", 1), workers)
        worker.sent.clear()
    yield coordinator, workers
    coordinator.close()


def reload(coordinator: Coordinator, workers: list) -> None:
    """A SIGHUP, and the supervisor's loop until the decision is made and sent."""
    coordinator.request()
    coordinator.tick(workers)
    futures.wait([coordinator._deciding], 10)
    coordinator.tick(workers)


def test_every_worker_prepares_then_all_switch(started):
    coordinator, workers = started
    reload(coordinator, workers)
    assert [w.kinds() for w in workers] == [[("prepare", 2)]] * 2
    coordinator.received(workers[0], ("prepared", 2, None), workers)
    assert workers[0].kinds() == [("prepare", 2)] and coordinator.served.generation == 1  # not before all
    coordinator.received(workers[1], ("prepared", 2, None), workers)
    assert [w.kinds()[-1] for w in workers] == [("commit", 2)] * 2 and coordinator.served.generation == 2


def test_one_worker_that_cannot_prepare_makes_every_worker_drop_the_set(started):
    coordinator, workers = started
    reload(coordinator, workers)
    coordinator.received(workers[0], ("prepared", 2, None), workers)
    coordinator.received(workers[1], ("prepared", 2, ("cgan", "out of memory")), workers)
    assert [w.sent[-1][0] for w in workers] == ["abort", "abort"] and coordinator.served.generation == 1
    assert coordinator.failure == ("cgan", "worker 12: out of memory")


def test_a_worker_that_dies_while_preparing_fails_the_reload(started):
    coordinator, workers = started
    reload(coordinator, workers)
    coordinator.received(workers[0], ("prepared", 2, None), workers)
    coordinator.gone(workers[1], workers)
    assert workers[0].sent[-1][0] == "abort" and coordinator.served.generation == 1
    assert "worker 12 died while preparing generation 2" in coordinator.failure[1]


def test_a_worker_starting_during_a_reload_is_held_then_prepares_the_set_that_won(started):
    coordinator, workers = started
    reload(coordinator, workers)
    newcomer = FakeWorker(13)  # started with generation 1, the one served when it was spawned
    workers.append(newcomer)
    coordinator.received(newcomer, ("prepared", 1, None), workers)
    assert newcomer.sent == [] and newcomer.held == 1  # neither commit 1 nor left out of 2
    for worker in workers[:2]:
        coordinator.received(worker, ("prepared", 2, None), workers)
    assert newcomer.kinds() == [("prepare", 2)]  # what the others serve now
    coordinator.received(newcomer, ("prepared", 2, None), workers)
    assert newcomer.kinds()[-1] == ("commit", 2)


def test_a_worker_told_to_commit_just_before_a_reload_takes_part_in_it(started):
    coordinator, workers = started
    newcomer = FakeWorker(13)
    workers.append(newcomer)
    coordinator.received(newcomer, ("prepared", 1, None), workers)
    assert newcomer.kinds() == [("commit", 1)] and not newcomer.ready  # its "serving" is still on its way
    reload(coordinator, workers)
    assert newcomer.kinds() == [("commit", 1), ("prepare", 2)]
    coordinator.received(newcomer, ("serving", 1), workers)
    for worker in workers:
        coordinator.received(worker, ("prepared", 2, None), workers)
    assert [w.kinds()[-1] for w in workers] == [("commit", 2)] * 3


def test_a_decision_that_fails_is_told_to_every_worker_and_stale_answers_are_ignored(started):
    coordinator, workers = started
    coordinator.lifecycle.refuse = "quality gate: confidence 0.1"
    reload(coordinator, workers)
    assert [w.sent for w in workers] == [[("failed", ("cgan", "quality gate: confidence 0.1"))]] * 2
    coordinator.received(workers[0], ("prepared", 7, None), workers)  # from nothing under way: ignored
    assert len(workers[0].sent) == 1 and coordinator.served.generation == 1


def test_signals_during_a_reload_coalesce_into_one_more(started):
    coordinator, workers = started
    reload(coordinator, workers)
    for _ in range(20):
        coordinator.request()
        coordinator.tick(workers)  # a reload is under way: nothing new starts
    assert coordinator._deciding is None
    for worker in workers:
        coordinator.received(worker, ("prepared", 2, None), workers)
    coordinator.tick(workers)
    futures.wait([coordinator._deciding], 10)
    coordinator.tick(workers)
    assert [w.kinds()[-1] for w in workers] == [("prepare", 3)] * 2 and coordinator.lifecycle.decided == 3
