"""Room names as NATS subject tokens (crdtchat/cluster/names.py): one-to-one, always valid."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdtchat.cluster.names import Names, room_from_token, room_token
from crdtchat.errors import ConfigError

# Every kind of character a room name may hold (design §3).
room_names = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=128)
NATS_SAFE_TOKEN = re.compile(r"\A[A-Za-z0-9_-]+\Z")


@given(room_names)
def test_a_room_token_is_one_safe_subject_token_and_gives_the_room_back(room: str) -> None:
    token = room_token(room)
    assert NATS_SAFE_TOKEN.fullmatch(token)  # no ".", "*", ">" or space: exactly one token
    assert room_from_token(token) == room


@given(room_names, room_names)
def test_different_rooms_get_different_tokens(first: str, second: str) -> None:
    assert (room_token(first) == room_token(second)) == (first == second)


def test_the_escapes_themselves() -> None:
    assert room_token("a.b_c") == "a_2eb_5fc"
    assert room_token("_2e") == "_5f2e"  # an escape-looking name is escaped, not confused
    assert room_from_token("_5f2e") == "_2e"


@pytest.mark.parametrize("room", ["", "a b", "a*", "a>", "x" * 129, "é"])
def test_what_is_not_a_room_name_is_refused(room: str) -> None:
    with pytest.raises(ValueError):
        room_token(room)


@pytest.mark.parametrize("token", ["a.b", "a_", "a_2", "a_41", "*"])
def test_what_no_room_maps_to_is_refused(token: str) -> None:
    with pytest.raises(ValueError):
        room_from_token(token)


def test_names_under_a_prefix() -> None:
    names = Names("my-app")
    assert names.stream == "MY_APP_ROOMS"
    assert names.room_subject("a.b") == "my-app.room.a_2eb"
    assert names.presence_subject("a.b") == "my-app.presence.a_2eb"
    with pytest.raises(ConfigError):
        Names("has.dot")
