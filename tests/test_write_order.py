"""WriteOrder: a range waits for exactly the earlier-admitted ranges that
overlap it and are still unreleased, however the ranges are laid out."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dstfuse.ranges import RangeTicket, WriteOrder

#: (offset, length) pairs on a small span, so that many overlap; lengths of
#: 0 count as 1 byte, as for a FLUSH-less zero-length write.
ranges = st.tuples(st.integers(0, 200), st.integers(0, 60))
#: ("admit", range) or ("release", index of an admitted ticket)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), ranges),
        st.tuples(st.just("release"), st.integers(0, 1000)),
    ),
    max_size=60,
)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    a_end = a[0] + max(a[1], 1)
    b_end = b[0] + max(b[1], 1)
    return a[0] < b_end and b[0] < a_end


@settings(max_examples=300, deadline=None)
@given(steps)
def test_a_range_waits_for_exactly_the_overlapping_unreleased_ranges(script) -> None:
    order = WriteOrder()
    admitted: list[tuple[tuple[int, int], RangeTicket]] = []
    live: list[int] = []  # indexes into admitted, unreleased
    for action, value in script:
        if action == "admit":
            ticket = order.register(*value)
            expected = {id(admitted[i][1]) for i in live if _overlap(admitted[i][0], value)}
            got = {id(t) for t in ticket.earlier or ()}
            assert got == expected, (value, [admitted[i][0] for i in live])
            live.append(len(admitted))
            admitted.append((value, ticket))
        elif live:
            index = live.pop(value % len(live))
            order.release(admitted[index][1])
        assert len(order) == len(live)
        for probe in ((0, 0), (50, 10), (199, 61)):
            assert order.overlaps(*probe) == any(_overlap(admitted[i][0], probe) for i in live)


async def test_admit_waits_until_every_earlier_overlapping_range_is_released() -> None:
    order = WriteOrder()
    first = await order.admit(0, 4096)
    second = await order.admit(1 << 20, 1 << 20)  # far away: admitted at once
    admitted: list[RangeTicket] = []

    async def overlapping() -> None:
        admitted.append(await order.admit(4000, 200))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(overlapping)
        await trio.testing.wait_all_tasks_blocked()
        assert not admitted
        order.release(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not admitted
        order.release(first)
    assert len(admitted) == 1 and admitted[0].earlier is None
    order.release(admitted[0])
    assert len(order) == 0


async def test_a_cancelled_wait_releases_its_ticket() -> None:
    order = WriteOrder()
    first = await order.admit(0, 10)
    with trio.move_on_after(0.01):
        await order.admit(5, 10)
    assert len(order) == 1
    order.release(first)
    assert not order.overlaps(0, 100)


def test_release_twice_is_harmless() -> None:
    order = WriteOrder()
    ticket = order.register(0, 10)
    twin = order.register(0, 10)  # same offset: release finds the right one
    order.release(ticket)
    order.release(ticket)
    assert len(order) == 1 and twin.earlier == [ticket]
    order.release(twin)
    assert len(order) == 0


@pytest.mark.parametrize("length", [1, 4096, 1 << 20])
def test_a_long_range_still_finds_short_ones_it_covers(length: int) -> None:
    order = WriteOrder()
    short = order.register(length - 1, 1)
    assert order.register(0, length).earlier == [short]
