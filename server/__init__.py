"""The crdtchat relay: y-websocket over websockets, SQLite persistence, roles."""
