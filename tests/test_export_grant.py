"""The write grant's decisions and the connection slots, as tables (no I/O)."""

from __future__ import annotations

import pytest

from dstfuse.export.grant import WriteGrant
from dstfuse.export.slots import ConnectionSlots

A, B, C = b"A" * 16, b"B" * 16, b"C" * 16
GRACE = 60.0


def claim(grant: WriteGrant, client: bytes, now: float = 0.0, *, take_over: bool = False):
    return grant.claim(client, client.decode()[:1], "10.0.0.1:5", now, take_over=take_over)


def test_the_first_writer_holds_the_grant_and_a_second_is_refused_naming_it():
    grant = WriteGrant(grace=GRACE)
    assert claim(grant, A).granted
    refused = claim(grant, B)
    assert not refused.granted and refused.holder is not None
    assert refused.holder.client_id == A
    assert str(refused.holder).startswith("client A (10.0.0.1:5) since ")
    assert claim(grant, A).granted  # its own reconnect


@pytest.mark.parametrize(
    ("closed_by_client", "later", "b_granted"),
    [
        (True, 0.0, True),  # clean close: released at once
        (False, GRACE - 1, False),  # lost connection: kept within the grace period
        (False, GRACE, True),  # ... and forgotten after it
    ],
)
def test_the_grant_after_the_holders_last_connection(closed_by_client, later, b_granted):
    grant = WriteGrant(grace=GRACE)
    claim(grant, A, 0.0)
    grant.detach(A, 10.0, closed_by_client=closed_by_client)
    assert claim(grant, B, 10.0 + later).granted is b_granted


def test_the_grant_is_kept_while_any_connection_of_the_holder_is_open():
    grant = WriteGrant(grace=GRACE)
    claim(grant, A)
    claim(grant, A)  # a reconnect that overlaps the old connection
    grant.detach(A, 1.0, closed_by_client=True)
    assert not claim(grant, B, 1.0 + 10 * GRACE).granted
    grant.detach(A, 2.0, closed_by_client=False)
    assert not claim(grant, B, 2.0 + GRACE - 1).granted
    assert claim(grant, B, 2.0 + GRACE).granted


def test_a_taker_displaces_the_holder_whose_connections_no_longer_count():
    grant = WriteGrant(grace=GRACE)
    claim(grant, A)
    taken = claim(grant, B, take_over=True)
    assert taken.granted and taken.displaced is not None and taken.displaced.client_id == A
    grant.detach(A, 1.0, closed_by_client=True)  # the displaced holder's end changes nothing
    refused = claim(grant, A, 2.0)
    assert not refused.granted and refused.holder.client_id == B
    assert not claim(grant, C, 3.0).granted


def test_a_shared_export_has_no_holder():
    grant = WriteGrant(shared=True, grace=GRACE)
    assert all(claim(grant, client).granted for client in (A, B, C))
    assert grant.holder(0.0) is None


def test_handshake_and_session_slots_are_counted_apart():
    slots = ConnectionSlots[str](max_handshakes=2, max_sessions=1)
    assert slots.begin_handshake("a") and slots.begin_handshake("b")
    assert not slots.begin_handshake("c")  # handshakes full
    assert slots.establish("a")
    assert slots.begin_handshake("c")  # a's handshake slot is free again
    assert not slots.establish("b")  # sessions full: b holds nothing now
    assert len(slots) == 2 and sorted(slots.all()) == ["a", "c"]
    slots.release("a")
    assert slots.establish("c") and len(slots) == 1
