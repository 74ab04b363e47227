"""The chat client's pure parts: command grammar, presence, thread choice, `crdtchat chat` setup."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from crdtchat import cli
from crdtchat.document import Conversation
from crdtchat.schema import ModelRef, assistant_turn_id
from crdtchat.tokens import mint_token
from crdtchat.tui import commands
from crdtchat.tui.main import SetupError, claim_device, read_token_subject
from crdtchat.tui.presence import describe, summarise
from crdtchat.tui.threads import regeneration_target, shown_thread, streams_on

MODEL = ModelRef(provider="p", api="a", model="m")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("hello", commands.Send("hello")),
        ("//etc is a path", commands.Send("/etc is a path")),
        ("/regen", commands.Regenerate()),
        ("/cancel", commands.Cancel()),
        ("/model gpt-4.1-mini", commands.SetModel("gpt-4.1-mini")),
        ("/provider anthropic", commands.SetProvider("anthropic")),
        ("/branch 3", commands.Branch(3)),
        ("/branch 3 new words here", commands.Branch(3, "new words here")),
        ("/branches", commands.ListBranches()),
        ("/switch 2", commands.Switch(2)),
        ("/follow", commands.Follow()),
        ("/attach 'my file.txt'", commands.Attach(Path("my file.txt"))),
        ("/export out.json", commands.Export(Path("out.json"))),
        ("   ", None),
    ],
)
def test_parse(line: str, expected: commands.Command | None) -> None:
    assert commands.parse(line) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("/nope", "unknown command /nope"),
        ("/regen now", "takes no argument"),
        ("/model", "needs one NAME"),
        ("/model a b", "needs one NAME"),
        ("/branch", "needs the number"),
        ("/branch x", "'x' is not a number"),
        ("/switch 0", "numbers start at 1"),
        ("/attach", "needs a PATH"),
        ("/attach 'open", "No closing quotation"),
        ("/export a b", "needs one PATH"),
    ],
)
def test_parse_refuses_with_a_reason(line: str, reason: str) -> None:
    with pytest.raises(commands.ChatCommandError, match=reason):
        commands.parse(line)


def test_presence_sorts_devices_people_and_ignores_malformed_states() -> None:
    states = {
        1: {"user": "alice", "device": "laptop", "typing": False},
        2: {"user": "alice", "device": "phone", "typing": True},
        3: {"user": "bob", "device": "desk", "typing": False},
        4: {"user": 42},  # not a presence state: ignored
        5: {},
        6: {"user": "carol"},  # no device name: named by client id
    }
    summary = summarise(states, my_client_id=1, me="alice")
    assert [p.device for p in summary.my_devices] == ["phone"]
    assert [p.user for p in summary.others] == ["bob", "carol"]
    assert [p.device for p in summary.typing] == ["phone"]
    assert describe(summary, "laptop") == "you: laptop (here), phone typing… · bob@desk, carol@#6"
    alone = summarise({1: states[1]}, my_client_id=1, me="alice")
    assert describe(alone, "laptop") == "you: laptop (here) · nobody else"


def test_shown_thread_follows_new_messages_under_the_anchor() -> None:
    conversation = Conversation.create(author="alice")
    q1 = conversation.append("user", "q1")
    a1 = conversation.append("assistant", "a1", status="complete", model=MODEL)
    other = conversation.append("user", "q1 edited", parent=None)
    assert shown_thread(conversation, None)[-1].id == other.id
    assert [m.id for m in shown_thread(conversation, q1.id)] == [q1.id, a1.id]
    q2 = conversation.append("user", "q2", parent=a1.id)
    assert shown_thread(conversation, q1.id)[-1].id == q2.id
    assert shown_thread(conversation, "gone")[-1].id == q2.id  # falls back to the current thread


def test_streams_on_thread_skip_malformed_and_committed_streams() -> None:
    conversation = Conversation.create(author="alice")
    question = conversation.append("user", "q")
    elsewhere = conversation.append("user", "another root", parent=None)
    worker = Conversation(conversation.doc, author="w")
    turn = assistant_turn_id(question.id, 1)
    worker.start_stream(turn, parent=question.id)
    worker.append_stream(turn, "partial")
    worker.start_stream(assistant_turn_id(elsewhere.id, 1), parent=elsewhere.id)
    conversation.streams["junk"] = {"parent": question.id}  # not a stream Map: skipped
    [stream] = streams_on(conversation, [question])
    assert (stream.turn_id, stream.holder, stream.text) == (turn, "w", "partial")
    assert regeneration_target([question]) is None
    worker.commit_turn(question.id, turn, model=MODEL, status="complete")
    thread = conversation.thread(turn)
    assert streams_on(conversation, thread) == []
    assert regeneration_target(thread) == question


def test_token_subject_is_read_without_the_secret() -> None:
    token = mint_token("secret", "room-1", "writer", "alice", 60)
    subject = read_token_subject(token)
    assert (subject.room, subject.role, subject.sub) == ("room-1", "writer", "alice")
    payload = base64.urlsafe_b64encode(json.dumps({"room": "r"}).encode()).decode().rstrip("=")
    for bad in ("nonsense", "v1.!!!.sig", f"v1.{payload}.sig"):
        with pytest.raises(SetupError):
            read_token_subject(bad)


def test_chat_command_refuses_bad_setup_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("CRDTCHAT_HOME", str(tmp_path))
    monkeypatch.delenv("CRDTCHAT_TOKEN", raising=False)
    assert cli.main(["chat", "room-1"]) == 1
    assert "CRDTCHAT_TOKEN is not set" in capsys.readouterr().err
    monkeypatch.setenv("CRDTCHAT_TOKEN", mint_token("s", "room-2", "writer", "alice", 60))
    assert cli.main(["chat", "room-1"]) == 1
    assert "the token is for room 'room-2'" in capsys.readouterr().err
    assert cli.main(["chat", "bad room!"]) == 1
    assert "invalid room name" in capsys.readouterr().err
    assert cli.main(["chat", "room-2", "--relay", "http://x"]) == 1
    assert "--relay must be" in capsys.readouterr().err
    # Several relays: the malformed one is named, at start (design §6).
    assert cli.main(["chat", "room-2", "--relay", "ws://127.0.0.1:1,ws//b"]) == 1
    assert "not a relay URL: 'ws//b'" in capsys.readouterr().err


def test_two_clients_on_one_machine_get_two_devices_and_two_stores(tmp_path: Path) -> None:
    with (
        claim_device(tmp_path, "room-1", "host") as (first, first_store),
        claim_device(tmp_path, "room-1", "host") as (second, second_store),
    ):
        assert (first, second) == ("host", "host-2")
        assert first_store != second_store
    with claim_device(tmp_path, "room-1", "host") as (again, again_store):
        assert (again, again_store) == ("host", first_store)  # the lock went with the client


def test_a_reply_cut_at_the_token_limit_reads_incomplete_not_as_an_error() -> None:
    from crdtchat.tui.widgets import status_label

    assert status_label("incomplete") == "incomplete (cut at the token limit)"
    assert status_label("error") == "error"
