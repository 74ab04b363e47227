"""Server-Sent Events decoding, sans-I/O: bytes in, events out.

Follows the WHATWG "event stream interpretation" rules so that the same stream gives the same
events however the network happens to chunk it: lines end in CRLF, LF or CR (a CR at the end of
one chunk and an LF at the start of the next are one line end), `:` lines are comments, a field
without a colon has an empty value, one leading space after the colon is dropped, several
`data:` lines join with "\\n", and a blank line dispatches. An event block cut off by the end of
the stream is never dispatched: `pending` tells the I/O layer that the stream was cut.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_BOM = "\ufeff"


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event. `id` is the last event id seen so far (it persists across events)."""

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder; feed it byte chunks in order, then call `close()` once."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._first_line = True
        self._closed = False
        # The event being assembled.
        self._event_type = ""
        self._data: list[str] = []
        self._has_fields = False
        # Persistent state (survives dispatch, per the spec).
        self.last_event_id = ""
        self.retry: int | None = None
        self._retry_in_block: int | None = None

    @property
    def pending(self) -> bool:
        """True if bytes or fields of an undispatched event are buffered (a cut stream)."""
        return bool(self._buffer) or self._has_fields

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume a chunk of the byte stream; return the events it completed."""
        if self._closed:
            raise ValueError("SSEDecoder.feed() after close()")
        if not chunk:
            return []
        self._buffer += chunk
        events: list[SSEEvent] = []
        buf = self._buffer
        start = 0
        n = len(buf)
        while start < n:
            cr = buf.find(b"\r", start)
            lf = buf.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                # A CR as the last byte may be the first half of a CRLF split across chunks.
                if cr == n - 1:
                    break
                end = cr
                nxt = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            else:
                end = lf
                nxt = lf + 1
            self._line(bytes(buf[start:end]), events)
            start = nxt
        del buf[:start]
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream. A trailing lone CR still ends a line; an unfinished event is dropped."""
        if self._closed:
            return []
        self._closed = True
        events: list[SSEEvent] = []
        if self._buffer.endswith(b"\r"):
            self._line(bytes(self._buffer[:-1]), events)
            self._buffer.clear()
        return events

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_fields = True
        elif name == "event":
            self._event_type = value
            self._has_fields = True
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
            self._has_fields = True
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
                self._retry_in_block = self.retry
            self._has_fields = True
        # Any other field name is ignored, as the spec says.

    def _dispatch(self, events: list[SSEEvent]) -> None:
        data, event_type, retry = self._data, self._event_type, self._retry_in_block
        self._data = []
        self._event_type = ""
        self._retry_in_block = None
        self._has_fields = False
        if not data:
            return
        events.append(
            SSEEvent(
                event=event_type or "message",
                data="\n".join(data),
                id=self.last_event_id,
                retry=retry,
            )
        )
