"""The supervisor's side of the one lifecycle: it decides, the workers prepare, all switch or none does.

A reload (SIGHUP to the supervisor) runs in three steps. The supervisor decides the next set off its main
loop (service/lifecycle.py: manifest checked, every file re-hashed, each new version gated once). It sends
the decision to every serving worker, which opens and warms it beside the set it serves
(service/reload.py: Follower) and answers `prepared`. When every one has, it sends `commit` and they swap;
when one cannot (or stays silent past PREPARE_TIMEOUT_S), it sends `abort` with the reason and every worker
keeps the set it had. SIGHUPs during a reload coalesce into one more reload after it.

A worker that starts (the first ones, or a replacement) is given the decision being served and joins only
when told to commit it; a worker that finished preparing while a reload was under way waits for its
outcome, then prepares the set it settled on. So every worker that listens serves the same set.

Messages, supervisor to worker: ("prepare", decision, failure), ("commit", generation),
("abort", generation, (what, why)), ("failed", (what, why)); worker to supervisor:
("prepared", generation, None or (what, why)), ("serving", generation).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.lifecycle import Lifecycle
from service.modelset import Decision, ReloadError

log = logging.getLogger("digitgen.lifecycle")

PREPARE_TIMEOUT_S = 300.0  # longest every worker may take to open and warm a new set


class Member(Protocol):
    """A worker as the coordinator sees it."""
    pid: int | None
    ready: bool  # it serves (it was told to commit, and said so)
    generation: int  # the decision it serves or prepares
    held: int | None  # a starting worker's prepared generation, held while a reload is under way
    committing: int | None  # a starting worker told to commit its first set, not yet serving it

    def send(self, message: tuple) -> None: ...


@dataclass
class _Reload:
    decision: Decision
    waiting: set[int]  # pids that have not answered yet
    members: list[Any]
    deadline: float = field(default_factory=lambda: time.monotonic() + PREPARE_TIMEOUT_S)


class Coordinator:
    def __init__(self, lifecycle: Lifecycle, counter=None):
        self.lifecycle = lifecycle
        self.counter = counter  # digitgen_reloads_total, by result
        self.failure: tuple[str, str] | None = None  # the last reload's, until one succeeds
        self.wanted = False  # a SIGHUP asked for a reload
        self._deciding: Future | None = None
        self._reload: _Reload | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="decide")

    @property
    def served(self) -> Decision:
        assert self.lifecycle.current is not None
        return self.lifecycle.current

    def start(self) -> Decision:
        """Start-up: the first decision (refused versions left out). ReloadError when the manifest cannot
        be read."""
        decision = self.lifecycle.decide(strict=False)
        self.lifecycle.commit(decision)
        log.info("generation %d decided: %d version(s) admitted%s", decision.generation, len(decision.admitted),
                 f", refused: {', '.join(decision.refused)}" if decision.refused else "")
        return decision

    def request(self) -> None:
        """SIGHUP (from a signal handler: only a flag)."""
        self.wanted = True

    def tick(self, members: list[Any]) -> None:
        """From the supervisor's loop: finish a decision that is ready, time out a reload, start the next."""
        if self._deciding is not None and self._deciding.done():
            deciding, self._deciding = self._deciding, None
            self._decided(deciding, members)
        if self._reload is not None and time.monotonic() > self._reload.deadline:
            silent = ", ".join(str(pid) for pid in sorted(self._reload.waiting))
            self._abort(("reload", f"worker(s) {silent} did not prepare the new set within {PREPARE_TIMEOUT_S:.0f} s"),
                        members)
        if self.wanted and self._deciding is None and self._reload is None:
            self.wanted = False
            log.info("reload: deciding the next set")
            self._deciding = self._executor.submit(self.lifecycle.decide, True)

    def received(self, member, message: tuple, members: list[Any]) -> None:
        kind, generation, *rest = message
        if kind == "serving":
            member.ready, member.generation, member.committing = True, generation, None
            return
        if kind != "prepared":
            log.warning("worker %s sent %r; ignored", member.pid, kind)
            return
        error = rest[0]
        reload = self._reload
        if reload is not None and generation == reload.decision.generation and member.pid in reload.waiting:
            if error is not None:
                self._abort((error[0], f"worker {member.pid}: {error[1]}"), members)
                return
            reload.waiting.discard(member.pid)
            if not reload.waiting:
                self._commit(members)
            return
        if member.ready or error is not None:  # a starting worker that failed exits by itself
            return
        if reload is not None:
            member.held = generation  # joins once the reload settles
        elif generation == self.served.generation:
            member.committing = generation
            member.send(("commit", generation))
        else:
            member.send(("prepare", self.served, self.failure))

    def gone(self, member, members: list[Any]) -> None:
        """A worker died. Before it said it prepared the new set: the reload fails (preparing it may be what
        killed it), and its replacement starts with the set the others keep serving."""
        if self._reload is not None and member.pid in self._reload.waiting:
            self._abort(("reload", f"worker {member.pid} died while preparing generation "
                                   f"{self._reload.decision.generation}"), members)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _decided(self, deciding: Future, members: list[Any]) -> None:
        try:
            decision = deciding.result()
        except ReloadError as err:
            self._fail((err.what, err.reason), members, ("failed", (err.what, err.reason)))
            return
        except Exception as err:  # a bug must not end the supervisor: the old set keeps serving
            log.exception("reload: deciding failed")
            self._fail(("reload", f"deciding failed: {err}"), members, ("failed", ("reload", str(err))))
            return
        # every worker that serves, or was told to commit its first set (it serves soon, and gets this next)
        serving = [m for m in members if (m.ready or m.committing is not None) and m.pid is not None]
        self._reload = _Reload(decision, {m.pid for m in serving}, serving)
        log.info("reload: generation %d decided; %d worker(s) preparing it", decision.generation, len(serving))
        for member in serving:
            member.send(("prepare", decision, None))
        if not serving:
            self._commit(members)

    def _commit(self, members: list[Any]) -> None:
        reload, self._reload = self._reload, None
        assert reload is not None
        generation = reload.decision.generation
        self.lifecycle.commit(reload.decision)
        self.failure = None
        for member in reload.members:
            if member.pid is not None:
                member.send(("commit", generation))
        self._count("ok")
        log.info("reload: every worker prepared generation %d; switched", generation)
        self._release_held(members)

    def _abort(self, failure: tuple[str, str], members: list[Any]) -> None:
        reload, self._reload = self._reload, None
        assert reload is not None
        for member in reload.members:
            if member.pid is not None:
                member.send(("abort", reload.decision.generation, failure))
        self._fail(failure, members, None)
        self._release_held(members)

    def _fail(self, failure: tuple[str, str], members: list[Any], tell: tuple | None) -> None:
        self.failure = failure
        self._count("failed")
        log.error("reload failed, the previous models keep serving: %s: %s", *failure)
        if tell is not None:
            for member in members:
                if member.pid is not None:
                    member.send(tell)

    def _release_held(self, members: list[Any]) -> None:
        """Starting workers that prepared while a reload ran: commit what they have, or prepare what won."""
        for member in members:
            if member.held is None or member.pid is None:
                continue
            held, member.held = member.held, None
            if held == self.served.generation:
                member.committing = held
                member.send(("commit", held))
            else:
                member.send(("prepare", self.served, self.failure))

    def _count(self, result: str) -> None:
        if self.counter is not None:
            self.counter.labels(result).inc()
