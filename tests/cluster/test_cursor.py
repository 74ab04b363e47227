"""`RoomCursor`: a node's position in a room's subject and what each entry is to it, without
I/O (crdtchat/cluster/cursor.py). relaynode.py runs it on JetStream; the simulated nodes of
crdtchat.testing run it in the relay machine (tests/testing/test_cluster_machine.py)."""

from __future__ import annotations

from pycrdt import Doc

from crdtchat.cluster.cursor import Consumed, RoomCursor, publish_after_rollup
from crdtchat.cluster.entries import LogEntry
from crdtchat.document import Conversation
from crdtchat.relay.protocol import Append
from crdtchat.testing import SimulatedRelay
from crdtchat.wire import SyncUpdate

NOW = 1_700_000_000.0


def test_own_writes_come_back_as_own_others_as_foreign_and_known_ones_are_skipped() -> None:
    cursor = RoomCursor(node_id="n1", last=4, token="t")
    mine = cursor.msg_id(7)
    assert mine == "n1:t:0.7"
    assert cursor.consume(LogEntry(5, b"", msg_id=mine)) is Consumed.OWN
    assert cursor.last == 5
    assert cursor.consume(LogEntry(3, b"", msg_id="n2:x:0.1")) is Consumed.KNOWN
    assert cursor.consume(LogEntry(6, b"", msg_id="n2:x:0.2")) is Consumed.FOREIGN
    assert cursor.last == 5, "a foreign entry moves `last` only once applied"
    rollup = LogEntry(6, b"", snapshot=True, covers=5, msg_id="room:snapshot:5")
    assert cursor.consume(rollup) is Consumed.KNOWN and cursor.last == 6
    other_load = RoomCursor(node_id="n1", last=0, token="u")
    assert other_load.consume(LogEntry(7, b"", msg_id=mine)) is Consumed.FOREIGN


def test_a_withdrawal_gives_later_writes_new_message_ids() -> None:
    cursor = RoomCursor(node_id="n1", last=0, token="t")
    before = cursor.msg_id(1)
    cursor.withdraw()
    assert cursor.msg_id(1) != before and cursor.epoch == 1


def test_only_the_node_whose_write_crossed_the_threshold_rolls_up_while_nothing_came_after() -> (
    None
):
    cursor = RoomCursor(node_id="n1", last=0, token="t")
    cursor.published(3, 10)
    assert cursor.compaction_covers(3) == 10
    assert cursor.compaction_covers(2) is None, "not a write this node published"
    cursor.last = 11  # another node wrote after it
    assert cursor.compaction_covers(3) is None


def test_a_publish_refused_by_a_rollup_of_the_state_it_was_judged_against_goes_after_it() -> None:
    assert publish_after_rollup(LogEntry(9, b"", snapshot=True, covers=8), expected=8) == 9
    assert publish_after_rollup(LogEntry(9, b"", snapshot=True, covers=7), expected=8) is None
    assert publish_after_rollup(LogEntry(9, b""), expected=8) is None
    assert publish_after_rollup(None, expected=8) is None


def write(author: str, client_id: int, text: str) -> bytes:
    """An update appending one message, as `author`'s device writes it."""
    conversation = Conversation(Doc(client_id=client_id), author=author, clock=lambda: NOW)
    conversation.append("user", text, parent=None, message_id=f"{author}-{text}")
    return conversation.doc.get_update()


def test_a_foreign_write_over_unstored_ones_withdraws_applies_and_judges_them_again() -> None:
    relay = SimulatedRelay()
    relay.start()
    relay.connect(0, "writer", "alice")
    mine = write("alice", 1, "mine")
    relay.receive(0, SyncUpdate(mine), NOW)
    (append,) = relay.store.writes
    assert isinstance(append, Append)
    cursor = RoomCursor(node_id="n1", last=0, token="t")
    far = LogEntry(1, write("carol", 2, "far"), msg_id="n2:x:0.1")
    actions = cursor.apply_foreign(far, relay.room, NOW)
    (again,) = [action for action in actions if isinstance(action, Append)]
    assert cursor.epoch == 1 and cursor.last == 1
    assert cursor.stream_seq == {1: 1}, "the foreign write is the core's update 1"
    assert again.seq == 2 and again.update == append.update

    calm, idle = RoomCursor(node_id="n1", last=0, token="t"), SimulatedRelay()
    idle.start()
    assert not [a for a in calm.apply_foreign(far, idle.room, NOW) if isinstance(a, Append)]
    assert calm.epoch == 0 and idle.room.durable_seq == 1
