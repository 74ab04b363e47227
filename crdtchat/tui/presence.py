"""Who else is here, from awareness states (design §3: presence never goes into the document).

A state is `{"user": sub, "device": name, "typing": bool}`. Other clients may publish anything,
so a state that does not have this shape is ignored rather than trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Peer:
    user: str
    device: str
    typing: bool
    client_id: int


@dataclass(frozen=True)
class PresenceSummary:
    my_devices: tuple[Peer, ...]  # this person's other devices
    others: tuple[Peer, ...]  # everyone else (people and workers)

    @property
    def typing(self) -> tuple[Peer, ...]:
        return tuple(p for p in (*self.my_devices, *self.others) if p.typing)


def local_state(user: str, device: str, typing: bool) -> dict[str, Any]:
    return {"user": user, "device": device, "typing": typing}


def summarise(
    states: Mapping[int, Mapping[str, Any]], *, my_client_id: int, me: str
) -> PresenceSummary:
    mine: list[Peer] = []
    others: list[Peer] = []
    for client_id, state in states.items():
        if client_id == my_client_id or not isinstance(state, Mapping):
            continue
        user, device = state.get("user"), state.get("device")
        if not isinstance(user, str) or not user:
            continue
        peer = Peer(
            user=user,
            device=device if isinstance(device, str) and device else f"#{client_id}",
            typing=state.get("typing") is True,
            client_id=client_id,
        )
        (mine if user == me else others).append(peer)
    return PresenceSummary(tuple(sorted(mine)), tuple(sorted(others)))


def describe(summary: PresenceSummary, my_device: str) -> str:
    """One line: `you: laptop (here), phone · bob@desk typing…`."""
    mine = [f"{my_device} (here)", *(_label(p, mine=True) for p in summary.my_devices)]
    parts = [", ".join(mine)]
    if summary.others:
        parts.append(", ".join(_label(p, mine=False) for p in summary.others))
    else:
        parts.append("nobody else")
    return "you: " + " · ".join(parts)


def _label(peer: Peer, *, mine: bool) -> str:
    name = peer.device if mine else f"{peer.user}@{peer.device}"
    return f"{name} typing…" if peer.typing else name
