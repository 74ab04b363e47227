"""crdtchat: local-first LLM conversations as Yjs-compatible CRDT documents."""
