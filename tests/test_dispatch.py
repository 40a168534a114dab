"""Groups of hosts, how many hosts a request gets, and which group runs which request when
(the policy rank 0 follows, without MPI)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from star_engine.dispatch import LATER, Dispatch, Group, described, group_sizes, groups_of_size
from star_engine.groups import hosts_by_rule, level_max_tokens


def test_hosts_form_aligned_groups_of_powers_of_two_and_one_of_all():
    assert group_sizes(1) == [1]
    assert group_sizes(4) == [1, 2, 4]
    assert group_sizes(8) == [1, 2, 4, 8]
    assert group_sizes(6) == [1, 2, 4, 6]
    assert [list(g.hosts) for g in groups_of_size(2, 4)] == [[0, 1], [2, 3]]
    # Where a size does not divide the hosts, those left over belong to no group of it.
    assert [list(g.hosts) for g in groups_of_size(4, 6)] == [[0, 1, 2, 3]]
    assert described(4) == "4 hosts form groups of 1, 2 and 4"
    assert described(6) == "6 hosts form groups of 1, 2, 4 (hosts 0-3) and 6"
    assert described(1) == "1 host form groups of 1"


@pytest.mark.parametrize("context, hosts", [(100, 1), (32768, 1), (32769, 2), (65536, 2), (65537, 4),
                                            (131072, 4), (131073, 8), (10**7, 8)])
def test_a_request_gets_the_fewest_hosts_whose_blocks_hold_at_most_max_block_tokens(context, hosts):
    assert hosts_by_rule(context, 32768, 8) == hosts


def test_the_rule_rounds_up_to_a_group_size_and_stops_at_all_hosts():
    assert hosts_by_rule(3 * 1024, 1024, 8) == 4  # three blocks' worth: a group of 4
    assert hosts_by_rule(5 * 1024, 1024, 6) == 6  # more than 4 hosts: all 6
    assert hosts_by_rule(100 * 1024, 1024, 4) == 4  # more than all: all


def test_a_smaller_group_is_sized_for_the_contexts_the_rule_gives_it():
    assert level_max_tokens(1, 32768, 131072) == 32768 + 8192
    assert level_max_tokens(2, 32768, 131072) == 2 * 32768 + 8192
    assert level_max_tokens(2, 32768, 50000) == 50000  # never beyond the job's


PATIENT = 100  # younger requests that may go before a waiting one: more than any test hands out


def test_requests_of_one_size_spread_over_every_free_group_of_it():
    dispatch = Dispatch(4, PATIENT)
    for number in range(8):
        dispatch.add(number, 1)
    started = dispatch.start()
    assert started == [Group(1, 0), Group(1, 1), Group(1, 2), Group(1, 3)]
    assert [dispatch.give(g) for g in started] == [0, 1, 2, 3]


def test_a_group_that_holds_more_work_than_another_of_its_size_takes_no_more_for_now():
    dispatch = Dispatch(2, PATIENT)
    for number, tokens in enumerate([7000, 1000, 1000, 1000, 1000]):
        dispatch.add(number, 1, tokens)
    one, two = dispatch.start()
    assert (dispatch.give(one), dispatch.give(two)) == (0, 1)
    assert dispatch.give(one) == LATER  # 7000 tokens against 1000
    assert [dispatch.give(two) for _ in range(3)] == [2, 3, 4]  # up to 4000
    dispatch.answered(one, 0)
    assert dispatch.give(one) is None  # none waits: it drains


def test_a_group_takes_requests_of_its_size_oldest_first_until_none_waits():
    dispatch = Dispatch(2, PATIENT)
    for number, size in enumerate([2, 2, 2]):
        dispatch.add(number, size)
    [group] = dispatch.start()
    assert [dispatch.give(group) for _ in range(4)] == [0, 1, 2, None]
    dispatch.release(group)
    assert dispatch.done


def test_a_group_keeps_the_questions_of_the_context_it_holds_and_others_take_other_contexts():
    dispatch = Dispatch(2, PATIENT)
    for number, context in enumerate("aaabbc"):
        dispatch.add(number, 1, context=context)
    one, two = dispatch.start()
    assert [dispatch.give(one), dispatch.give(two)] == [0, 3]  # b: no other group holds it
    assert [dispatch.give(one), dispatch.give(two), dispatch.give(one), dispatch.give(two)] == [1, 4, 2, 5]


def test_a_group_takes_a_context_another_holds_rather_than_stand_idle():
    dispatch = Dispatch(2, PATIENT)
    for number in range(3):
        dispatch.add(number, 1, context="a")
    one, two = dispatch.start()
    assert [dispatch.give(one), dispatch.give(two)] == [0, 1]


def test_questions_of_a_held_context_overtake_an_older_request_only_as_often_as_the_patience_allows():
    dispatch = Dispatch(1, patience=2)
    dispatch.add(0, 1, context="a")
    dispatch.add(1, 1, context="b")
    for number in range(2, 6):
        dispatch.add(number, 1, context="a")
    [group] = dispatch.start()
    assert [dispatch.give(group) for _ in range(4)] == [0, 2, 3, 1]  # b overtaken twice, then taken
    assert [dispatch.give(group) for _ in range(3)] == [4, 5, None]


def test_smaller_requests_go_first_and_larger_groups_take_the_hosts_they_leave():
    dispatch = Dispatch(2, PATIENT)
    for number, size in enumerate([2, 1, 2, 1, 1]):
        dispatch.add(number, size)
    started = dispatch.start()
    assert started == [Group(1, 0), Group(1, 1)]  # the older requests of both hosts wait
    assert [dispatch.give(g) for g in started] == [1, 3]
    assert dispatch.give(started[0]) == 4
    assert dispatch.give(started[1]) is None  # none of its size waits: it drains
    dispatch.release(started[1])
    assert dispatch.start() == []  # host 0 still works
    assert dispatch.give(started[0]) is None
    dispatch.release(started[0])
    assert dispatch.start() == [Group(2, 0)]
    assert [dispatch.give(Group(2, 0)) for _ in range(3)] == [0, 2, None]


def test_a_large_request_does_not_starve_behind_a_stream_of_small_ones():
    """Once `patience` younger requests have gone before a request for all hosts, the one-host
    groups take no new work: each drains what it holds, and the large request starts before
    any small request younger than that."""
    dispatch = Dispatch(4, patience=6)
    dispatch.add(0, 4)  # the large request
    for number in range(1, 40):
        dispatch.add(number, 1)  # and a stream of small ones
    small = dispatch.start()
    assert small == [Group(1, 0), Group(1, 1), Group(1, 2), Group(1, 3)]
    assert [dispatch.give(g) for g in small] + [dispatch.give(small[0])] == [1, 2, 3, 4, 5]
    assert dispatch.reservation() is None  # overtaken 5 times
    assert dispatch.give(small[1]) == 6
    assert dispatch.reservation() == (0, Group(4, 0))  # overtaken 6 times: it reserves every host
    assert [dispatch.give(g) for g in small] == [None] * 4  # every small group drains
    assert dispatch.start() == []  # its hosts are not free yet
    for group in small:
        dispatch.release(group)
    assert dispatch.start() == [Group(4, 0)]
    assert dispatch.give(Group(4, 0)) == 0


def test_a_small_request_does_not_starve_beside_a_group_of_large_ones_that_keeps_finding_work():
    dispatch = Dispatch(2, patience=2)
    for number in range(3):
        dispatch.add(number, 2)
    [pair] = dispatch.start()
    assert dispatch.give(pair) == 0
    dispatch.add(3, 1)  # no host free for it
    for number in range(4, 8):
        dispatch.add(number, 2)
    assert [dispatch.give(pair) for _ in range(2)] == [1, 2]  # younger than nothing waiting
    assert [dispatch.give(pair) for _ in range(2)] == [4, 5]  # the small request overtaken twice
    assert dispatch.reservation() == (3, Group(1, 0))
    assert dispatch.give(pair) is None  # the pair drains for it
    dispatch.release(pair)
    assert dispatch.start() == [Group(1, 0)]  # and host 1 stays free for the pair's next group
    assert dispatch.give(Group(1, 0)) == 3


def test_younger_requests_run_beside_a_reservation_on_hosts_outside_it():
    dispatch = Dispatch(4, patience=0)  # every request that no group serves reserves at once
    dispatch.add(0, 1)
    assert dispatch.start() == [Group(1, 0)]
    assert dispatch.give(Group(1, 0)) == 0
    dispatch.add(1, 4)  # waits for host 0: reserves every host
    dispatch.add(2, 1)
    assert dispatch.start() == []  # the younger request waits: no host lies outside the reservation

    dispatch = Dispatch(4, patience=0)
    for number in range(3):
        dispatch.add(number, 1)
    started = dispatch.start()  # hosts 0, 1, 2
    assert [dispatch.give(g) for g in started] == [0, 1, 2]
    dispatch.release(Group(1, 1))  # host 1 free, and host 3
    dispatch.add(3, 2)  # reserves hosts 0-1 (as free as hosts 2-3, and first)
    dispatch.add(4, 1)  # younger: starts on host 3, outside the reservation, not on host 1
    assert dispatch.reservation() == (3, Group(2, 0))
    assert dispatch.start() == [Group(1, 3)]
    assert dispatch.give(Group(1, 0)) is None  # on the reserved hosts: drains
    assert dispatch.give(Group(1, 3)) == 4


@pytest.mark.parametrize("hosts", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("patience", [0, 3, PATIENT])
def test_every_request_is_handed_out_once_and_groups_never_share_a_host(hosts, patience):
    import random

    generator = random.Random(hosts)
    dispatch = Dispatch(hosts, patience)
    sizes = group_sizes(hosts)
    for number in range(60):
        dispatch.add(number, generator.choice(sizes))
    handed, running = [], []
    while not dispatch.done:
        running += dispatch.start()
        busy = [h for g in running for h in g.hosts]
        assert len(busy) == len(set(busy)), running
        group = running.pop(generator.randrange(len(running)))
        number = dispatch.give(group)
        if number is None:
            dispatch.release(group)
        elif number == LATER:  # it decodes a step, and a request it held ends
            dispatch.answered(group, min(dispatch.holding[group]))
            running.append(group)
        else:
            handed.append(number)
            running.append(group)
    assert sorted(handed) == list(range(60))


def test_a_stop_hands_out_nothing_more_and_ends_once_what_runs_is_released():
    dispatch = Dispatch(2, PATIENT)
    for number in range(4):
        dispatch.add(number, 1)
    started = dispatch.start()
    dispatch.stop()
    assert [dispatch.give(g) for g in started] == [None, None]
    assert not dispatch.done
    for group in started:
        dispatch.release(group)
    assert dispatch.done and dispatch.start() == []


class GroupEngine:
    """An engine of groups of some size: plans requests of up to `tokens` tokens."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def plan(self, context: int, query: int, new: int, shared_context: bool = False, question_tokens=None):
        from star_engine.request_plan import RequestTooLarge

        if context + query + new > self.tokens:
            raise RequestTooLarge(f"request needs {context + query + new} tokens, the limit is {self.tokens}")
        return ("plan", context)


def test_a_request_a_smaller_group_cannot_hold_goes_to_the_next_larger_one():
    from star_engine.groups import RequestSizing
    from star_engine.request_plan import RequestTooLarge
    from star_engine.settings import ScaleOutSettings

    engines = {1: GroupEngine(1000), 2: GroupEngine(1500), 4: GroupEngine(9000)}
    sizing = RequestSizing(engines, 4, ScaleOutSettings("auto", 800), 800)
    assert sizing.plan(700, 10, 10)[0] == 1
    assert sizing.plan(990, 10, 10)[0] == 2  # one block by the rule, but one host's cache is too small
    assert sizing.plan(1600, 10, 10)[0] == 4
    with pytest.raises(RequestTooLarge, match="the limit is 9000"):
        sizing.plan(9000, 10, 10)
    assert RequestSizing(engines, 4, ScaleOutSettings("2"), 800).plan(10, 1, 1)[0] == 2
    assert RequestSizing(engines, 4, ScaleOutSettings("all"), 800).plan(10, 1, 1)[0] == 4


def test_with_a_time_to_first_token_target_a_request_gets_the_fewest_hosts_predicted_to_meet_it():
    from star_engine.groups import RequestSizing
    from star_engine.settings import ScaleOutSettings

    engines = {1: GroupEngine(10**6), 2: GroupEngine(10**6), 4: GroupEngine(10**6)}

    def predicted(hosts, context, query, new):  # seconds: quadratic work shared by the hosts
        return SimpleNamespace(ttft_s=(context / 1000) ** 2 / hosts, tpot_s=0.01)

    sizing = RequestSizing(engines, 4, ScaleOutSettings("auto", None, 10.0), 32768, predicted)
    assert sizing.plan(3000, 1, 1)[0] == 1  # 9 s on one host
    assert sizing.plan(4000, 1, 1)[0] == 2  # 16 s on one, 8 s on two
    assert sizing.plan(6000, 1, 1)[0] == 4  # 9 s on four
    assert sizing.plan(20000, 1, 1)[0] == 4  # none meets it: all hosts
