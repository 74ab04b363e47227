"""The crdtchat relay: y-websocket over websockets, SQLite, roles (design §3, §4, §7)."""
