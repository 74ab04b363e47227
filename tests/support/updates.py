"""A hypothesis strategy for documents edited through the pycrdt API by two clients."""

from __future__ import annotations

from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

texts = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(["😀", "𝄞", "é"])),
    max_size=12,
)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False)
    | texts
    | st.binary(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def edited_docs(draw: st.DrawFn) -> tuple[Doc, list[bytes]]:
    """A document edited by two clients through the pycrdt API; returns it and its updates."""
    ids = draw(st.lists(st.integers(1, 2**32), min_size=2, max_size=2, unique=True))
    docs = [Doc(client_id=client) for client in ids]
    updates: list[bytes] = []
    for step in range(draw(st.integers(1, 12))):
        doc = docs[draw(st.integers(0, 1))]
        before = doc.get_state()
        root = doc.get("m", type=Map)
        key = draw(st.sampled_from(["a", "b", "t", "l"]))
        action = draw(st.sampled_from(["set", "text", "edit", "list", "delete"]))
        if action == "set":
            root[key] = draw(values)
        elif action == "text":
            root[key] = Text(draw(texts))
        elif action == "list":
            root[key] = Array([draw(values), Map({"x": draw(values)})])
        elif action == "delete" and key in root:
            del root[key]
        elif action == "edit" and isinstance(root.get(key), Text):
            text = root[key]
            current = str(text)
            position = draw(st.integers(0, len(current)))
            offset = len(current[:position].encode())  # pycrdt indexes UTF-8 bytes
            end = len(current[: position + 1].encode())
            if draw(st.booleans()) or end == offset:
                text.insert(offset, draw(texts))
            else:
                del text[offset:end]
        update = doc.get_update(before)
        if update != b"\x00\x00":
            updates.append(update)
            other = docs[1 - docs.index(doc)]
            if draw(st.booleans()) or step == 0:
                other.apply_update(update)
    merged = Doc()
    for update in updates:
        merged.apply_update(update)
    return merged, updates
