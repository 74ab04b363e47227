"""The terminal chat client (`crdtchat chat ROOM`), built on Textual.

The app only ever talks to a `Conversation` (the document) and a `Link` (how the document
reaches the relay), so it can be driven headless in tests against either.
"""
