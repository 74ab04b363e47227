// Reading a person's list document (design §2) exactly as crdtchat.conversations
// .ConversationList.entries does; a module of its own, without the page's browser imports, so
// that tests/test_web_list.py runs it in node against the Python reader.

export const ROOM_NAME = /^[A-Za-z0-9._-]{1,128}$/

/** The list's entries as ConversationList.entries reads them: bad entries skipped, pinned
 * first, then the most recently added. `archived` null: all. */
export function listEntries (doc, archived = false) {
  const rooms = doc.getMap('list.rooms')
  const titles = doc.getMap('list.titles')
  const pinned = doc.getMap('list.pinned')
  const hidden = doc.getMap('list.archived')
  const marks = doc.getMap('list.read')
  const found = []
  for (const [room, value] of rooms.entries()) {
    if (!ROOM_NAME.test(room)) continue
    const added = value && typeof value === 'object' && !Array.isArray(value) ? value.added_at : undefined
    const title = titles.get(room)
    const mark = marks.get(room)
    const entry = {
      room,
      addedAt: typeof added === 'number' ? added : typeof added === 'boolean' ? Number(added) : 0, // Python: bool is an int
      title: typeof title === 'string' ? title : null,
      pinned: pinned.get(room) === true,
      archived: hidden.get(room) === true,
      read: typeof mark === 'string' ? mark : null
    }
    if (archived === null || entry.archived === archived) found.push(entry)
  }
  found.sort((a, b) => (a.pinned !== b.pinned ? (a.pinned ? -1 : 1)
    : a.addedAt !== b.addedAt ? b.addedAt - a.addedAt : a.room < b.room ? -1 : a.room > b.room ? 1 : 0))
  return found
}
