// The conversation list at /. With an identity token it is the person's list document (design
// §2, "The list document"), a Yjs peer like a conversation page, so a conversation created on
// one device appears on the others live; it reads and writes the list.* roots as
// crdtchat.conversations.ConversationList does. What others change (titles, unread counts,
// last activity) comes from the relay's GET /rooms/<room>/summary. With a room token there is
// no list document: the page shows the rooms this browser has opened (renderList).
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { IndexeddbPersistence } from 'y-indexeddb'
import { personRoom, relayRequest, checkToken } from './session.js'
import { ROOM_NAME, listEntries } from './listdoc.js'
import { h } from './dom.js'
import { toHexString } from 'lib0/buffer'

const SUMMARY_EVERY_MS = 15000 // others' posts are not in the list document: ask again this often

/** A fresh conversation id, random as crdtchat.conversations.new_room_name. */
function newRoomName () {
  const bytes = crypto.getRandomValues(new Uint8Array(12))
  return 'c-' + toHexString(bytes)
}

export class ListPage {
  constructor (root, token, sub) {
    this.root = root
    this.token = token
    this.sub = sub
    this.room = personRoom(sub)
    this.doc = new Y.Doc()
    this.summaries = new Map() // room -> the relay's summary, or {error}
    this.showArchived = false
    this.online = false
  }

  async start () {
    this.build()
    this.idb = new IndexeddbPersistence(`crdtchat:${this.room}`, this.doc)
    await this.idb.whenSynced
    this.doc.on('afterTransaction', () => this.schedule())
    this.render()
    const wsBase = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`
    this.provider = new WebsocketProvider(wsBase, this.room, this.doc, {
      params: { token: this.token }, disableBc: true, maxBackoffTime: 5000
    })
    this.provider.on('status', ({ status }) => {
      this.online = status === 'connected'
      this.showConnection()
      if (this.online) this.refreshSummaries()
    })
    this.provider.on('connection-close', () => this.checkAccess())
    this.refreshSummaries()
    this.timer = setInterval(() => { if (!document.hidden) this.refreshSummaries() }, SUMMARY_EVERY_MS)
    document.addEventListener('visibilitychange', () => { if (!document.hidden) this.refreshSummaries() })
  }

  /** A refused upgrade shows as 1006 only: ask the relay whether the token is still good,
   * and on a refusal say so and stop reconnecting (an expired identity token, say). */
  async checkAccess () {
    if (this.checking) return
    this.checking = true
    try {
      const answer = await checkToken(this.room, this.token)
      if (!answer.ok) {
        this.provider.disconnect()
        this.notice(`Access refused: ${answer.reason}. Sign in again with a new link.`)
      }
    } catch {
      // offline: keep trying, the websocket will tell
    } finally {
      this.checking = false
    }
  }

  /** Resolves once y-indexeddb has written what was changed before the call: a transaction
   * on its store opened now runs after the write transactions opened before it. */
  stored () {
    const db = this.idb.db
    if (!db) return Promise.resolve()
    return new Promise((resolve) => {
      const transaction = db.transaction(['updates'], 'readonly')
      transaction.oncomplete = transaction.onerror = transaction.onabort = () => resolve()
      transaction.objectStore('updates').count()
    })
  }

  // -- the list document's writes (as ConversationList) -----------------------------------

  add (room, title) {
    this.doc.transact(() => {
      const rooms = this.doc.getMap('list.rooms')
      if (!rooms.has(room)) rooms.set(room, { added_at: Date.now() / 1000 })
      if (title) this.doc.getMap('list.titles').set(room, title)
    })
  }

  rename (room, title) {
    const titles = this.doc.getMap('list.titles')
    if (title) titles.set(room, title)
    else titles.delete(room) // back to the conversation's own title
  }

  leave (room) {
    this.doc.transact(() => {
      for (const name of ['list.rooms', 'list.titles', 'list.pinned', 'list.archived', 'list.read']) {
        this.doc.getMap(name).delete(room)
      }
    })
  }

  // -- the page -------------------------------------------------------------------------------

  build () {
    this.connectionNode = h('span', { class: 'connection', role: 'status', 'aria-live': 'polite' })
    this.noticeNode = h('p', { class: 'notice', role: 'alert', hidden: true })
    const title = h('input', { 'aria-label': 'New conversation title', placeholder: 'Title (optional)' })
    const create = h('form', {
      class: 'new',
      onsubmit: async (event) => {
        event.preventDefault()
        const room = newRoomName()
        this.add(room, title.value.trim() || null)
        // Leaving the page must not lose the entry: sent already if online (y-websocket sends
        // at once), and kept in IndexedDB for the next visit either way.
        await this.stored()
        // Opening it with the identity token makes the person its owner (design §4).
        location.assign(`/c/${room}`)
      }
    }, title, h('button', { type: 'submit' }, 'New conversation'))
    const shared = h('input', { 'aria-label': 'Conversation shared with you', placeholder: 'Room shared with you' })
    const accept = h('form', {
      class: 'new',
      onsubmit: (event) => {
        event.preventDefault()
        const room = shared.value.trim()
        if (!ROOM_NAME.test(room)) {
          this.notice(`A room name is 1-128 of A-Za-z0-9._-, not ${JSON.stringify(room.slice(0, 140))}`)
          return
        }
        this.add(room, null) // design §2: a shared room enters the list when its person adds it
        shared.value = ''
        this.notice('')
      }
    }, shared, h('button', { type: 'submit' }, 'Add'))
    this.archivedButton = h('button', { type: 'button', onclick: () => { this.showArchived = !this.showArchived; this.render() } })
    this.heading = h('h1', { text: 'Conversations' })
    this.listNode = h('ul', { class: 'rooms' })
    this.root.replaceChildren(h('header', {}, this.heading, this.connectionNode, this.archivedButton),
      this.noticeNode, create, accept, this.listNode)
    this.showConnection()
  }

  showConnection () {
    this.connectionNode.textContent = this.online ? 'online' : 'offline'
    this.connectionNode.dataset.state = this.online ? 'stored' : 'offline'
  }

  notice (text) {
    this.noticeNode.textContent = text
    this.noticeNode.hidden = !text
  }

  schedule () {
    if (this.scheduled) return
    this.scheduled = true
    requestAnimationFrame(() => {
      this.scheduled = false
      this.render()
    })
  }

  titleOf (entry) {
    const summary = this.summaries.get(entry.room)
    return entry.title || (summary && summary.title) || entry.room
  }

  render () {
    if (this.editing) return // a form is open in the list: keep it until it is done
    const entries = listEntries(this.doc, this.showArchived)
    this.heading.textContent = this.showArchived ? 'Archived conversations' : 'Conversations'
    this.archivedButton.textContent = this.showArchived ? 'Show current' : 'Show archived'
    const items = entries.map((entry) => this.item(entry))
    if (!items.length) {
      items.push(h('li', { class: 'empty', text: this.showArchived ? 'Nothing archived.' : 'No conversations yet: start one above.' }))
    }
    this.listNode.replaceChildren(...items)
    for (const entry of entries) if (!this.summaries.has(entry.room)) this.refreshSummary(entry)
    document.body.dataset.ready = 'true'
  }

  item (entry) {
    const summary = this.summaries.get(entry.room)
    const link = h('a', { href: `/c/${encodeURIComponent(entry.room)}`, text: this.titleOf(entry) })
    const facts = []
    if (summary && !summary.error) {
      if (summary.unread) facts.push(h('span', { class: 'unread', text: `${summary.unread} unread` }))
      if (typeof summary.last_activity === 'number') {
        facts.push(h('span', { class: 'when', text: new Date(summary.last_activity * 1000).toLocaleString() }))
      }
    }
    const button = (label, action) => h('button', { type: 'button', onclick: action }, label)
    const actions = h('span', { class: 'actions' },
      button(entry.pinned ? 'Unpin' : 'Pin', () => this.doc.getMap('list.pinned').set(entry.room, !entry.pinned)),
      button('Rename', () => this.openForm(item, this.renameForm(entry))),
      button(entry.archived ? 'Unarchive' : 'Archive', () => this.doc.getMap('list.archived').set(entry.room, !entry.archived)),
      button('Share', () => this.openForm(item, this.shareForm(entry))),
      button('Leave', () => this.leave(entry.room)))
    const item = h('li', { 'data-room': entry.room },
      entry.pinned ? h('span', { class: 'pin', 'aria-label': 'pinned', text: '📌 ' }) : null,
      link, ' ', ...facts, actions)
    return item
  }

  openForm (item, form) {
    this.editing = true
    item.append(form)
    form.querySelector('input').focus()
  }

  closeForm () {
    this.editing = false
    this.render()
  }

  renameForm (entry) {
    const input = h('input', { 'aria-label': 'Title', value: entry.title || '' })
    return h('form', {
      class: 'inline',
      onsubmit: (event) => {
        event.preventDefault()
        this.rename(entry.room, input.value.trim() || null)
        this.closeForm()
      }
    }, input, h('button', { type: 'submit' }, 'Save title'),
    h('button', { type: 'button', onclick: () => this.closeForm() }, 'Cancel'))
  }

  shareForm (entry) {
    const who = h('input', { 'aria-label': 'Share with (subject)', required: true })
    const role = h('select', { 'aria-label': 'Role' },
      h('option', { value: 'reader' }, 'reader'), h('option', { value: 'writer' }, 'writer'),
      h('option', { value: 'remove' }, 'remove access'))
    return h('form', {
      class: 'inline',
      onsubmit: async (event) => {
        event.preventDefault()
        const sub = who.value.trim()
        if (!sub) return
        const body = role.value === 'remove' ? { sub, remove: true } : { sub, role: role.value }
        let text
        try {
          const answer = await relayRequest('POST', `/rooms/${encodeURIComponent(entry.room)}/members`, this.token, body)
          text = answer.ok
            ? (body.remove ? `${sub} no longer has access` : `shared with ${sub} as ${body.role}`)
            : `Could not share: ${(await answer.text()).trim()}`
        } catch {
          text = 'Could not share: the relay cannot be reached (sharing needs to be online)'
        }
        this.closeForm()
        this.notice(text)
      }
    }, who, role, h('button', { type: 'submit' }, 'Share'),
    h('button', { type: 'button', onclick: () => this.closeForm() }, 'Cancel'))
  }

  // -- summaries from the relay -----------------------------------------------------------------

  refreshSummaries () {
    for (const entry of listEntries(this.doc, null)) this.refreshSummary(entry)
  }

  async refreshSummary (entry) {
    this.asking = this.asking || new Map() // room -> whether to ask again when this answers
    if (this.asking.has(entry.room)) {
      this.asking.set(entry.room, true) // the answer on its way may predate what changed
      return
    }
    this.asking.set(entry.room, false)
    try {
      const query = entry.read ? `?read=${encodeURIComponent(entry.read)}` : ''
      const answer = await relayRequest('GET', `/rooms/${encodeURIComponent(entry.room)}/summary${query}`, this.token)
      // 403 for a room nobody has opened yet (no owner, no members): nothing to show yet
      this.summaries.set(entry.room, answer.ok ? await answer.json() : { error: answer.status })
    } catch {
      if (!this.summaries.has(entry.room)) this.summaries.set(entry.room, { error: 'offline' })
    }
    const again = this.asking.get(entry.room)
    this.asking.delete(entry.room)
    this.schedule()
    if (again) this.refreshSummary(entry)
  }
}

/**
 * The person's list document without its page: a conversation page opened with an identity
 * token writes its read mark there (`list.read`). `whenReady` resolves once the stored copy
 * is loaded and the relay has synced, so that an entry is not judged missing too early.
 */
export class PersonList {
  constructor (token, sub) {
    const room = personRoom(sub)
    this.doc = new Y.Doc()
    this.idb = new IndexeddbPersistence(`crdtchat:${room}`, this.doc)
    const wsBase = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`
    this.provider = new WebsocketProvider(wsBase, room, this.doc, {
      params: { token }, disableBc: true, maxBackoffTime: 5000
    })
    this.whenReady = this.idb.whenSynced.then(() => this.provider.synced ||
      new Promise((resolve) => this.provider.once('sync', resolve)))
  }

  /** `id` read in `room`, if the room is in the list (a mark never adds an entry). */
  markRead (room, id) {
    if (!this.doc.getMap('list.rooms').has(room)) return
    const marks = this.doc.getMap('list.read')
    if (marks.get(room) !== id) marks.set(room, id)
  }
}

/** The rooms this browser has opened: the list for room tokens, which name no person. */
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
