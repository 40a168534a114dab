"""Which group of hosts runs which request, and when: the policy rank 0 follows when it
hands requests out (hand_out.py carries its decisions over MPI). Pure bookkeeping, without
MPI or PyTorch, so that it is tested alone.

Requests wait in the order they arrive, each for a group of its size. A group that runs
takes the oldest request of its size each time it has room (its continuous batch), until
none waits or it is told to drain: then it finishes what it holds and its hosts are free.
Free hosts start a group for any size that has requests waiting.

Contexts: requests about one context follow one another in the input (run orders them so).
A group takes next a request about the context it took last, which its engine holds
encoded; another group of the size takes first requests about contexts no running group
of the size holds, and one about a held context only when nothing else of its size waits
(encoding it again rather than standing idle).

Balance: where several groups of a size run, one that holds requests takes no more while
another of its size holds less work (the requests' predicted seconds): it is told
"later", decodes a step, and asks again; so requests of a size spread over its groups by
their work, not by which group asked first.

Order: smaller requests go first. Free hosts start groups for the smallest sizes that
have requests waiting, so short requests finish early instead of queueing behind a long
phase 1 (the shortest-first rule that minimises the mean wait), while groups of larger
sizes take the hosts as the smaller requests run out.

Fairness: a request may be overtaken only so often. Each request handed out overtakes
every older one still waiting; a request overtaken `patience` times (the hand-out's
read-ahead, so at most that many younger requests go before it) goes next among its size,
and where no group of its size runs it reserves one (the one with the most hosts free):
the groups on those hosts take no request younger than it (they drain) and its free hosts
stay free, until the reserved group can start. A large request so never starves behind a
stream of small ones, nor a small one behind a group of large ones that keeps finding
work, nor a question behind the questions of another context.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

LATER = "later"  # what `give` says to a group that holds work while another of its size holds less


@dataclass(frozen=True)
class Group:
    """`size` consecutive hosts from `first`: the index-th group of its size."""
    size: int
    index: int

    @property
    def first(self) -> int:
        return self.size * self.index

    @property
    def hosts(self) -> range:
        return range(self.first, self.first + self.size)

    def overlaps(self, other: Group) -> bool:
        return self.first < other.first + other.size and other.first < self.first + self.size


def read_ahead(batch: int, hosts: int) -> int:
    """How many requests rank 0 reads ahead of the groups, which is also how many younger
    requests may go before a waiting one: four batches for every host."""
    return 4 * batch * hosts


def group_sizes(hosts: int) -> list[int]:
    """The sizes of the groups of `hosts` hosts: the powers of two below it, and all."""
    return [1 << k for k in range(hosts.bit_length()) if 1 << k < hosts] + [hosts]


def groups_of_size(size: int, hosts: int) -> list[Group]:
    """The aligned groups of `size` of `hosts` hosts: hosts left over where `size` does not
    divide their number belong to no group of that size."""
    return [Group(size, index) for index in range(hosts // size)]


def described(hosts: int) -> str:
    """'4 hosts form groups of 1, 2 and 4'; where hosts are left over, which groups exist:
    '6 hosts form groups of 1, 2, 4 (hosts 0-3) and 6'."""
    parts = []
    for size in group_sizes(hosts):
        covered = size * (hosts // size)
        parts.append(f"{size}" if covered == hosts else f"{size} (hosts 0-{covered - 1})")
    listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"{hosts} host{'s' * (hosts != 1)} form groups of {listed}"


class Dispatch:
    """The state of the job's hosts and of the requests not yet handed out, on rank 0.
    Requests are known by their number; a group by its size and index."""

    def __init__(self, hosts: int, patience: int) -> None:
        self.hosts, self.patience = hosts, patience
        self.sizes = group_sizes(hosts)
        self.waiting: OrderedDict[int, int] = OrderedDict()  # request number -> its group size, oldest first
        self.work: dict[int, float] = {}  # request number -> its work (predicted seconds), until answered
        self.overtaken: dict[int, int] = {}  # waiting request number -> younger requests handed out before it
        self.context: dict[int, Hashable] = {}  # waiting request number -> its context's key (None: its own)
        self.encoded: dict[Group, Hashable] = {}  # a running group -> the context of the last request it took
        self.holding: dict[Group, set[int]] = {}  # a running group -> the requests it holds
        self.running: set[Group] = set()
        self.draining: set[Group] = set()  # running, told to take no new work
        self.stopped = False

    def add(self, number: int, size: int, work: float = 1.0, context: Hashable = None) -> None:
        """A request of `number` waits for a group of `size` hosts; `work`: its cost;
        `context`: what names its context, the same for the requests about one (None: a
        context of its own)."""
        if size not in self.sizes:
            raise ValueError(f"no group of {size} hosts among {self.hosts}")
        self.waiting[number] = size
        self.work[number] = work
        self.overtaken[number] = 0
        self.context[number] = context

    def answered(self, group: Group, number: int) -> None:
        """The group answered a request it held."""
        self.holding[group].discard(number)
        del self.work[number]

    def stop(self) -> None:
        """No more work is handed out; what runs finishes."""
        self.stopped = True
        self.draining |= self.running

    @property
    def done(self) -> bool:
        """Nothing runs, and nothing will: every request is handed out, or the job stops."""
        return not self.running and (self.stopped or not self.waiting)

    def waiting_for(self, size: int) -> int:
        return sum(1 for s in self.waiting.values() if s == size)

    def reservation(self) -> tuple[int, Group] | None:
        """The oldest request that has waited long enough (overtaken `patience` times) and
        that no group of its size serves, and the group it waits for."""
        serving = {g.size for g in self.running - self.draining}
        due = next(((number, size) for number, size in self.waiting.items()
                    if size not in serving and self.overtaken[number] >= self.patience), None)
        if due is None:
            return None
        number, size = due
        busy = self._busy_hosts()
        return number, max(groups_of_size(size, self.hosts),
                           key=lambda g: (sum(h not in busy for h in g.hosts), -g.index))

    def start(self) -> list[Group]:
        """The groups to start now, on free hosts, each of which then asks `give`: the
        reserved group once its hosts are free, and groups for the sizes that have requests
        waiting, smallest first, on hosts outside the reservation."""
        if self.stopped:
            return []
        started = []
        while True:
            reservation = self.reservation()
            reserved = reservation[1] if reservation is not None else None
            if reserved is None or not self._free(reserved):
                break
            self._run(reserved)
            started.append(reserved)
        for size in sorted(set(self.waiting.values())):
            wanted = self.waiting_for(size) - sum(1 for g in started if g.size == size)
            for group in groups_of_size(size, self.hosts):
                if wanted <= 0:
                    break
                if self._free(group) and not (reserved is not None and group.overlaps(reserved)):
                    self._run(group)
                    started.append(group)
                    wanted -= 1
        return started

    def give(self, group: Group) -> int | str | None:
        """The request a running group takes next (of its size: about the context it holds,
        else the oldest); LATER (another group of its size holds less work); or None: it
        drains (it is told to, none of its size waits, or an older request has reserved some
        of its hosts)."""
        if group not in self.running:
            raise ValueError(f"{group} is not running")
        if group in self.draining:
            return None
        number = self._next(group, [n for n, size in self.waiting.items() if size == group.size])
        reservation = self.reservation()
        if number is not None and reservation is not None and reservation[1].overlaps(group) \
                and self._older(reservation[0], number):
            number = None
        if number is None:
            self.draining.add(group)
            return None
        held = self._held(group)
        if held and any(self._held(g) < held for g in self.running - self.draining if g.size == group.size):
            return LATER
        for older in self.waiting:
            if older == number:
                break
            self.overtaken[older] += 1
        self.encoded[group] = self.context[number]
        del self.waiting[number], self.overtaken[number], self.context[number]
        self.holding[group].add(number)
        return number

    def _next(self, group: Group, candidates: list[int]) -> int | None:
        """Of the waiting requests of the group's size (oldest first): the oldest once it has
        been overtaken `patience` times; else the oldest about the context the group holds;
        else the oldest about a context no other running group of its size holds; else the
        oldest."""
        if not candidates or self.overtaken[candidates[0]] >= self.patience:
            return candidates[0] if candidates else None
        held = self.encoded.get(group)
        others = {self.encoded.get(g) for g in self.running - self.draining if g != group and g.size == group.size}
        same = [n for n in candidates if held is not None and self.context[n] == held]
        fresh = [n for n in candidates if self.context[n] is None or self.context[n] not in others]
        return (same or fresh or candidates)[0]

    def _older(self, first: int, second: int) -> bool:
        """Whether waiting request `first` came before waiting request `second`."""
        return next(n for n in self.waiting if n in (first, second)) == first

    def _held(self, group: Group) -> float:
        return sum(self.work[n] for n in self.holding[group])

    def release(self, group: Group) -> None:
        """A group finished its work: its hosts are free."""
        self.running.discard(group)
        self.draining.discard(group)
        self.encoded.pop(group, None)
        for number in self.holding.pop(group, set()):
            self.work.pop(number, None)

    def _busy_hosts(self) -> set[int]:
        return {h for g in self.running for h in g.hosts}

    def _free(self, group: Group) -> bool:
        busy = self._busy_hosts()
        return not any(h in busy for h in group.hosts)

    def _run(self, group: Group) -> None:
        self.running.add(group)
        self.holding[group] = set()
