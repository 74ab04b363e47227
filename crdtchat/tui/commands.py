"""What the person typed into the composer: a message to send, or a slash command.

Pure parsing, no document and no UI, so that every command's grammar is testable on its own
and a typo becomes a clear message instead of a message sent to the model.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from crdtchat.errors import ConfigError


class ChatCommandError(ConfigError, ValueError):
    """The input looked like a chat command (/...) but is not a valid one; the text says why.
    Not `crdtchat.errors.CommandError`, which is a failed command-line program."""


@dataclass(frozen=True)
class Send:
    text: str


@dataclass(frozen=True)
class Regenerate:
    """Ask for another answer to the message the last answer on the shown thread answers."""


@dataclass(frozen=True)
class Cancel:
    """Stop the reply being streamed on the shown thread."""


@dataclass(frozen=True)
class SetModel:
    name: str


@dataclass(frozen=True)
class SetProvider:
    name: str


@dataclass(frozen=True)
class SetSystem:
    text: str


@dataclass(frozen=True)
class Branch:
    """Edit message `number` of the shown thread: a sibling with the same parent.

    Without `text` the message is loaded into the composer and the next send is the edit.
    """

    number: int
    text: str | None = None


@dataclass(frozen=True)
class ListBranches:
    pass


@dataclass(frozen=True)
class Switch:
    """Show the thread ending at leaf `number` of the last /branches list."""

    number: int


@dataclass(frozen=True)
class Follow:
    """Go back to the shared default: the current thread (design §2)."""


@dataclass(frozen=True)
class Attach:
    path: Path


@dataclass(frozen=True)
class Detach:
    """Drop the attachments waiting for the next message."""


@dataclass(frozen=True)
class Export:
    path: Path


@dataclass(frozen=True)
class Recover:
    """Drop the local changes the relay refused (they block later writes) and reload."""


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Quit:
    pass


Command = (
    Send
    | Regenerate
    | Cancel
    | SetModel
    | SetProvider
    | SetSystem
    | Branch
    | ListBranches
    | Switch
    | Follow
    | Attach
    | Detach
    | Export
    | Recover
    | Help
    | Quit
)

HELP = """\
/regen              another answer to the last question on this thread   (ctrl+r)
/cancel             stop the reply being streamed                          (ctrl+x)
/model NAME         use model NAME from now on;  /provider NAME likewise
/system TEXT        set the system prompt
/branch N [TEXT]    edit message N: a new branch from its parent (no TEXT: edit in the composer)
/branches           list the branches (threads) of this conversation
/switch N           show branch N of that list;  /follow  back to the newest thread
/attach PATH        upload a file and attach it to the next message;  /detach  drop them
/export PATH        write the conversation as portable JSON
/recover            after the relay refused a write: drop unstored changes, reload, keep the draft
/quit               leave                                                  (ctrl+q)
//text              send a message that starts with /"""


def parse(line: str) -> Command | None:
    """The command in `line`; None for nothing to do (blank input)."""
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Send(line)
    if line.startswith("//"):
        return Send(line[1:])
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    name = name.lower()
    if name in ("regen", "regenerate", "retry"):
        _no_argument(name, rest)
        return Regenerate()
    if name in ("cancel", "stop"):
        _no_argument(name, rest)
        return Cancel()
    if name == "model":
        return SetModel(_one_word(name, rest, "NAME"))
    if name == "provider":
        return SetProvider(_one_word(name, rest, "NAME"))
    if name == "system":
        return SetSystem(rest)
    if name in ("branch", "edit"):
        number, _, text = rest.partition(" ")
        if not number:
            raise ChatCommandError(f"/{name} needs the number of a message: /{name} N [TEXT]")
        text = text.strip()
        return Branch(_number(name, number), text or None)
    if name == "branches":
        _no_argument(name, rest)
        return ListBranches()
    if name == "switch":
        return Switch(_number(name, _one_word(name, rest, "N")))
    if name == "follow":
        _no_argument(name, rest)
        return Follow()
    if name == "attach":
        return Attach(Path(_path(name, rest)).expanduser())
    if name == "detach":
        _no_argument(name, rest)
        return Detach()
    if name == "export":
        return Export(Path(_path(name, rest)).expanduser())
    if name == "recover":
        _no_argument(name, rest)
        return Recover()
    if name in ("help", "?"):
        return Help()
    if name in ("quit", "exit", "q"):
        return Quit()
    raise ChatCommandError(f"unknown command /{name} (try /help; // sends a line starting with /)")


def _no_argument(name: str, rest: str) -> None:
    if rest:
        raise ChatCommandError(f"/{name} takes no argument")


def _one_word(name: str, rest: str, what: str) -> str:
    if not rest or len(rest.split()) != 1:
        raise ChatCommandError(f"/{name} needs one {what}")
    return rest


def _number(name: str, text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ChatCommandError(f"/{name}: {text!r} is not a number") from None
    if number < 1:
        raise ChatCommandError(f"/{name}: numbers start at 1")
    return number


def _path(name: str, rest: str) -> str:
    if not rest:
        raise ChatCommandError(f"/{name} needs a PATH")
    try:
        parts = shlex.split(rest)
    except ValueError as error:
        raise ChatCommandError(f"/{name}: {error}") from None
    if len(parts) != 1:
        raise ChatCommandError(f"/{name} needs one PATH (quote it if it has spaces)")
    return parts[0]
