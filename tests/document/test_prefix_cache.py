"""RunningHashes reuses hashing work across turns and never serves a stale hash."""

from hypothesis import given
from hypothesis import strategies as st

from crdtchat.prefix import RunningHashes, prefix_hashes
from crdtchat.schema import Message

texts = st.text(max_size=12)


@st.composite
def threads(draw: st.DrawFn) -> list[Message]:
    contents = draw(st.lists(texts, min_size=1, max_size=8))
    return [
        Message(
            id=f"m{i}",
            role="user" if i % 2 == 0 else "assistant",
            author="a",
            parent=None if i == 0 else f"m{i - 1}",
            content=content,
        )
        for i, content in enumerate(contents)
    ]


@given(threads(), st.data(), texts, st.text(max_size=5))
def test_cached_hashes_equal_fresh_ones_after_any_edit_or_extension(
    thread: list[Message], data: st.DataObject, new_text: str, system: str
) -> None:
    cache = RunningHashes()
    assert cache.prefix_hashes(system, {}, thread) == prefix_hashes(system, {}, thread)
    # Edit one message on the path (same id, new content): everything from it on changes.
    where = data.draw(st.integers(0, len(thread) - 1))
    edited = [*thread]
    edited[where] = thread[where].model_copy(update={"content": new_text})
    assert cache.prefix_hashes(system, {}, edited) == prefix_hashes(system, {}, edited)
    # Extend the thread: the old states are reused, the result is still the definition.
    longer = [
        *edited,
        Message(id="next", role="user", author="a", parent=edited[-1].id, content=new_text),
    ]
    assert cache.prefix_hashes(system, {"t": {"x": 1}}, longer) == prefix_hashes(
        system, {"t": {"x": 1}}, longer
    )
