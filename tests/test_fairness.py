"""The fair-share rule (``acestep.fairness``): classes strictly first, then the tenant with the least
in service, then arrival; one tenant alone keeps its arrival order."""

from __future__ import annotations

import pytest

from acestep.fairness import Entry, Turns, fair_order, in_service, next_index, next_queue, priority_rank


def test_one_tenant_is_first_come_first_served():
    assert fair_order([Entry("a")] * 5, {}) == [0, 1, 2, 3, 4]


def test_a_flood_takes_turns_with_a_later_tenant():
    entries = [Entry("a")] * 40 + [Entry("b")]
    order = fair_order(entries, {})
    assert order.index(40) == 1  # b's one task goes second, not 41st
    assert [i for i in order if i != 40] == list(range(40))


def test_work_in_service_counts():
    entries = [Entry("a"), Entry("b"), Entry("a"), Entry("b")]
    assert fair_order(entries, {"a": 2}) == [1, 3, 0, 2]  # b runs nothing: b until even
    assert fair_order(entries, {}, limit=2) == [0, 1]


def test_costs_weigh_service():
    entries = [Entry("a", cost=2.0), Entry("b"), Entry("b"), Entry("a", cost=2.0)]
    assert fair_order(entries, {}) == [0, 1, 2, 3]  # after a's 2, b takes two turns of 1


def test_classes_are_strictly_ordered():
    entries = [Entry("a", priority=0), Entry("b", priority=1), Entry("a", priority=2), Entry("b", priority=1)]
    assert fair_order(entries, {"a": 100}) == [2, 1, 3, 0]


def test_next_queue_and_index():
    assert next_queue({}, {}) is None and next_index([], {}) is None
    assert next_queue({(1, "a"): 0, (1, "b"): 5}, {"a": 1}) == (1, "b")
    assert next_queue({(1, "a"): 0, (1, "b"): 5}, {}) == (1, "a")
    assert in_service([Entry("a", cost=2.0), Entry("a"), Entry("b")]) == {"a": 3.0, "b": 1.0}


def test_priority_names():
    assert priority_rank("low") < priority_rank("normal") < priority_rank("high")
    with pytest.raises(ValueError, match="priority.*low, normal, high"):
        priority_rank("urgent")


def test_ties_go_to_the_tenant_served_least_recently():
    entries = [Entry("a"), Entry("a"), Entry("c"), Entry("b")]
    assert fair_order(entries, {}, {"a": 5.0, "c": 7.0}) == [3, 0, 2, 1]


def test_one_slot_still_takes_turns():
    """One item in service at a time: a flood from a and c cannot keep b's item waiting."""
    turns = Turns()
    waiting = [Entry("a")] * 5 + [Entry("c")] * 5 + [Entry("b")]
    served = []
    while waiting:
        index = turns.pick(waiting, [])
        served.append(waiting.pop(index).tenant)
        turns.served(served[-1], waiting)
    assert served[:4] == ["a", "c", "b", "a"]
