// The conversation list at /. For now its source is the rooms this device has opened
// (session.roomsOpened); issue 14's per-person list document replaces that source, and this
// page only renders what it is given.

export function renderList (root, rooms) {
  const heading = document.createElement('h1')
  heading.textContent = 'Conversations'
  const list = document.createElement('ul')
  list.className = 'rooms'
  for (const { room, opened } of rooms) {
    const item = document.createElement('li')
    const link = document.createElement('a')
    link.href = `/c/${encodeURIComponent(room)}`
    link.textContent = room
    const when = document.createElement('span')
    when.className = 'when'
    when.textContent = new Date(opened).toLocaleString()
    item.append(link, ' ', when)
    list.append(item)
  }
  const empty = document.createElement('p')
  empty.textContent = 'No conversation opened on this device yet: open a link you were given (crdtchat token ... --link URL prints one).'
  root.replaceChildren(heading, rooms.length ? list : empty)
  document.body.dataset.ready = 'true'
}
