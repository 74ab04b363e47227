// The crdtchat web client (design §6, "Web client"): the conversation list at / and one
// conversation at /c/<room>, on the standard Yjs client stack (yjs, y-websocket, y-indexeddb).
// The document is the one of design §2; every read goes through the reading rules of rules.js.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { IndexeddbPersistence } from 'y-indexeddb'
import * as decoding from 'lib0/decoding'
import { ThreadIndex, parseCached, statusLabel, validRegenerate } from './rules.js'
import { renderMarkdown } from './markdown.js'
import { loadToken, tokenFromFragment, roomsOpened, rememberRoom, checkToken, checkMember, decodeClaims, isIdentity, keepIdentity, loadIdentity } from './session.js'
import { renderList, ListPage, PersonList } from './list.js'
import { h } from './dom.js'
import { MESSAGE_SYNC, syncHandler, loadFromIndexedDb } from './remote.js'
import { VirtualList } from './virtual.js'
import { joinPage } from './join.js'
import { toHexString } from 'lib0/buffer'

const MESSAGE_ACK = 100 // design §3: varUint(n), the first n sync updates are stored (or refused)
const MESSAGE_AUTH = 2
const TYPING_IDLE_MS = 3000
const KEEP_NODES = 400 // drawn message nodes kept for reuse before those out of view are dropped

function newId () {
  const bytes = crypto.getRandomValues(new Uint8Array(16))
  return toHexString(bytes)
}

function deviceName () {
  let name = localStorage.getItem('crdtchat.device')
  if (!name) {
    const kind = /Mobi|Android|iPhone/i.test(navigator.userAgent) ? 'phone' : 'browser'
    name = `${kind}-${newId().slice(0, 4)}`
    localStorage.setItem('crdtchat.device', name)
  }
  return name
}

/** Replace `ytext`'s content by `value` with the smallest edit (common prefix and suffix). */
function replaceText (ytext, value) {
  const old = ytext.toString()
  if (old === value) return
  let start = 0
  while (start < old.length && start < value.length && old[start] === value[start]) start++
  let end = 0
  while (end < old.length - start && end < value.length - start &&
    old[old.length - 1 - end] === value[value.length - 1 - end]) end++
  ytext.doc.transact(() => {
    if (old.length - start - end > 0) ytext.delete(start, old.length - start - end)
    if (value.length - start - end > 0) ytext.insert(start, value.slice(start, value.length - end))
  })
}

async function sha256Hex (buffer) {
  const digest = await crypto.subtle.digest('SHA-256', buffer)
  return toHexString(new Uint8Array(digest))
}

class ConversationPage {
  constructor (room, token, root) {
    this.room = room
    this.token = token
    this.root = root
    this.claims = decodeClaims(token) // unverified until the relay answers /auth
    this.sub = this.claims ? this.claims.sub : ''
    // An identity token's role is its membership, read from access.members (design §4)
    this.identity = isIdentity(this.claims)
    this.canWrite = this.claims ? this.claims.role === 'writer' : false
    this.doc = new Y.Doc()
    this.members = this.doc.getMap('access.members')
    this.messages = this.doc.getArray('canonical.messages')
    this.settings = this.doc.getMap('canonical.settings')
    this.meta = this.doc.getMap('canonical.meta')
    this.streams = this.doc.getMap('transport.streams')
    this.drafts = this.doc.getMap('transport.drafts')
    this.cancel = this.doc.getMap('transport.cancel')
    this.regenerate = this.doc.getMap('transport.regenerate')
    this.readMarks = this.doc.getMap('transport.read')
    this.index = new ThreadIndex([])
    this.leaf = null // a chosen branch's leaf; null follows the current thread
    this.shownElements = new Map() // message id -> {node, key}: drawn nodes, kept while unchanged
    this.rawMessages = new WeakMap() // Y.Map of a message -> its JSON, until the message changes
    this.pendingFiles = []
    this.localUpdates = [] // {conn, seq}: this page's updates not yet acknowledged
    this.connection = 0
    this.sent = 0
    this.refusal = null
    this.tokenProblem = null
    this.online = false
    this.stored = true
  }

  async start () {
    this.build()
    this.idb = new IndexeddbPersistence(`crdtchat:${this.room}`, this.doc)
    this.doc.on('afterTransaction', (transaction) => {
      this.forgetChanged(transaction)
      this.schedule()
    })
    if (this.identity) this.members.observe(() => this.roleFromMembers())
    if (await loadFromIndexedDb(this.idb)) this.localUpdates.push({ conn: -1, seq: -1 })
    performance.mark('crdtchat:stored-copy-loaded')
    // Our own edits, registered before the provider's handler so that each one is known
    // when the provider sends it (acknowledgements count the sync updates sent).
    this.doc.on('update', (_update, origin) => {
      if (origin !== this.provider && origin !== this.idb) this.localUpdates.push({ conn: -1, seq: -1 })
      this.showConnection()
    })
    if (this.identity) this.roleFromMembers()
    this.schedule()
    this.render()
    const wsBase = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}`
    this.provider = new WebsocketProvider(wsBase, this.room, this.doc, {
      params: { token: this.token, ext: 'ack' },
      connect: false,
      disableBc: true,
      maxBackoffTime: 5000
    })
    this.provider.messageHandlers[MESSAGE_SYNC] = syncHandler
    // design §3: an extension's payload is length-prefixed bytes; the Ack's holds varUint(n)
    this.provider.messageHandlers[MESSAGE_ACK] = (_encoder, decoder) =>
      this.onAck(decoding.readVarUint(decoding.createDecoder(decoding.readVarUint8Array(decoder))))
    this.provider.messageHandlers[MESSAGE_AUTH] = (_encoder, decoder) => {
      decoding.readVarUint(decoder) // 0: permission denied
      this.refusal = decoding.readVarString(decoder)
      this.showConnection()
    }
    this.provider.on('status', ({ status }) => {
      this.online = status === 'connected'
      if (this.online) this.watchSends()
      this.showConnection()
    })
    this.provider.on('sync', () => {
      if (this.identity) this.roleFromMembers()
      this.showConnection()
    })
    this.provider.on('connection-close', (event) => this.onClose(event))
    const awareness = this.provider.awareness
    awareness.setLocalStateField('user', { sub: this.sub, device: deviceName(), typing: false })
    awareness.on('change', () => this.showPresence())
    window.addEventListener('online', () => { if (!this.tokenProblem) this.provider.connect() })
    // Connect while /auth is asked, not after: a refused token stops the provider either way,
    // and a good one (the usual case) saves a round trip before the relay's state arrives.
    performance.mark('crdtchat:connecting')
    this.provider.connect()
    this.verifyToken()
  }

  /** Count the sync updates sent on this connection, as the relay counts them for its Acks. */
  watchSends () {
    const ws = this.provider.ws
    if (!ws || ws.crdtchatWatched) return
    ws.crdtchatWatched = true
    this.connection++
    this.sent = 0
    const connection = this.connection
    const send = ws.send.bind(ws)
    ws.send = (data) => {
      const bytes = data instanceof Uint8Array ? data : new Uint8Array(data)
      if (bytes[0] === 0 && (bytes[1] === 1 || bytes[1] === 2)) {
        const seq = this.sent++
        // everything made before this update that is not yet covered on this connection
        for (const item of this.localUpdates) if (item.conn !== connection) { item.conn = connection; item.seq = seq }
      }
      send(data)
    }
  }

  onAck (n) {
    this.localUpdates = this.localUpdates.filter((u) => !(u.conn === this.connection && u.seq < n))
    this.showConnection()
  }

  async onClose (event) {
    this.online = false
    this.showConnection()
    // A browser sees a refused upgrade as 1006 without the status: ask the relay instead.
    if (event && event.code === 4403) { // a member removed (design §4): say so, stop
      this.tokenProblem = event.reason || 'access revoked'
      this.provider.disconnect()
      this.showConnection()
      return
    }
    if (event === null || this.checking) return
    this.checking = true
    try { await this.verifyToken(true) } finally { this.checking = false }
  }

  /** Ask the relay whether the token is still good; stop connecting if it is not. After a
   * refused connection, an identity token is asked about its membership too (not before the
   * first: the first identity to open an empty room becomes its owner). */
  async verifyToken (afterClose = false) {
    let answer
    try {
      answer = await checkToken(this.room, this.token)
      if (answer.ok && this.identity && afterClose) {
        const member = await checkMember(this.room, this.token)
        if (!member.ok) answer = member
      }
    } catch {
      return true // offline: keep trying, the websocket will tell
    }
    if (answer.ok) {
      this.claims = answer.claims
      this.sub = answer.claims.sub
      if (!this.identity) this.canWrite = answer.claims.role === 'writer'
      this.tokenProblem = null
      this.applyRole()
      return true
    }
    this.tokenProblem = answer.reason
    if (this.provider) this.provider.disconnect()
    this.showConnection()
    return false
  }

  pending () { return this.localUpdates.length }

  /** An identity token writes as its membership allows: owner and writer, not reader. Until
   * the relay has synced, only "owner" is trusted from the local copy (an owner's entry never
   * changes; a writer may since have been made a reader). */
  roleFromMembers () {
    const member = this.members.get(this.sub)
    const role = member && typeof member === 'object' ? member.role : null
    const synced = this.provider ? this.provider.synced : false
    this.canWrite = role === 'owner' || (synced && role === 'writer')
    if (this.form) this.applyRole()
  }

  // -- building the page --------------------------------------------------------------

  build () {
    const title = h('h1', { class: 'title', text: this.room })
    this.titleNode = title
    this.connectionNode = h('span', { class: 'connection', role: 'status', 'aria-live': 'polite' })
    this.presenceNode = h('span', { class: 'presence', 'aria-live': 'polite' })
    const settingsButton = h('button', { type: 'button', onclick: () => this.toggleSettings() }, 'Settings')
    const exportButton = h('button', { type: 'button', onclick: () => this.exportJson() }, 'Export')
    const back = h('a', { href: '/', class: 'back', 'aria-label': 'Conversations' }, '☰')
    this.settingsPanel = this.buildSettings()
    const header = h('header', {}, back, title, this.connectionNode, this.presenceNode, settingsButton, exportButton)
    this.noticeNode = h('p', { class: 'notice', role: 'alert', hidden: true })
    this.list = h('div', { class: 'messages', role: 'log', 'aria-label': 'Messages' })
    this.scroller = h('main', { class: 'scroller' }, this.list)
    this.view = new VirtualList(this.scroller, this.list, {
      id: (message) => message.id,
      node: (message) => this.shownNode(message),
      tail: () => this.tailNodes()
    })
    this.composer = h('textarea', { 'aria-label': 'Message', rows: 2, placeholder: 'Message' })
    this.composer.addEventListener('input', () => this.onComposerInput())
    this.composer.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault()
        this.send()
      }
    })
    document.addEventListener('keydown', (event) => {
      if (event.key === 'Escape') this.stop()
    })
    this.fileInput = h('input', { type: 'file', multiple: true, hidden: true, onchange: () => this.attach() })
    this.attachButton = h('button', { type: 'button', onclick: () => this.fileInput.click() }, 'Attach')
    this.sendButton = h('button', { type: 'submit', class: 'send' }, 'Send')
    this.stopButton = h('button', { type: 'button', hidden: true, onclick: () => this.stop() }, 'Stop')
    this.attachments = h('ul', { class: 'attachments' })
    const form = h('form', { class: 'composer', onsubmit: (event) => { event.preventDefault(); this.send() } },
      this.attachments, this.fileInput, this.attachButton, this.composer, this.stopButton, this.sendButton)
    this.form = form
    this.readerNote = h('p', { class: 'reader-note', hidden: true }, 'You can read this conversation but not write to it.')
    this.root.replaceChildren(header, this.settingsPanel, this.noticeNode, this.scroller, this.readerNote, form)
    this.applyRole()
    this.showConnection()
  }

  applyRole () {
    const reader = !this.canWrite
    for (const node of [this.composer, this.sendButton, this.attachButton]) node.disabled = reader
    this.readerNote.hidden = !reader
    this.form.hidden = reader
    if (this.settingsInputs) for (const input of Object.values(this.settingsInputs)) input.disabled = reader
  }

  buildSettings () {
    const field = (label, node) => h('label', {}, label, node)
    this.settingsInputs = {
      provider: h('input', { name: 'provider', placeholder: 'e.g. local, openai, anthropic' }),
      model: h('input', { name: 'model' }),
      system: h('textarea', { name: 'system', rows: 3 }),
      params: h('textarea', { name: 'params', rows: 2, placeholder: '{"temperature": 0.7}' })
    }
    const i = this.settingsInputs
    this.settingsError = h('p', { class: 'error', role: 'alert' })
    return h('form', {
      class: 'settings',
      hidden: true,
      'aria-label': 'Settings',
      onsubmit: (event) => { event.preventDefault(); this.saveSettings() }
    },
    field('Provider', i.provider), field('Model', i.model), field('System prompt', i.system),
    field('Parameters (JSON)', i.params), this.settingsError,
    h('button', { type: 'submit' }, 'Save settings'))
  }

  toggleSettings () {
    const panel = this.settingsPanel
    panel.hidden = !panel.hidden
    if (!panel.hidden) {
      const s = this.settings.toJSON()
      const i = this.settingsInputs
      i.provider.value = typeof s.provider === 'string' ? s.provider : ''
      i.model.value = typeof s.model === 'string' ? s.model : ''
      i.system.value = typeof s.system === 'string' ? s.system : ''
      i.params.value = s.params && typeof s.params === 'object' ? JSON.stringify(s.params) : ''
    }
  }

  saveSettings () {
    const i = this.settingsInputs
    let params = null
    if (i.params.value.trim()) {
      try {
        params = JSON.parse(i.params.value)
      } catch (error) {
        this.settingsError.textContent = `Parameters are not JSON: ${error.message}`
        return
      }
      if (params === null || typeof params !== 'object' || Array.isArray(params)) {
        this.settingsError.textContent = 'Parameters must be a JSON object'
        return
      }
    }
    this.settingsError.textContent = ''
    this.doc.transact(() => {
      for (const key of ['provider', 'model', 'system']) {
        const value = i[key].value
        if (value !== '' || this.settings.has(key)) this.settings.set(key, value)
      }
      if (params !== null) this.settings.set('params', params)
    })
    this.settingsPanel.hidden = true
  }

  // -- reading and showing ----------------------------------------------------------------

  schedule () {
    if (this.scheduled) return
    this.scheduled = true
    requestAnimationFrame(() => {
      this.scheduled = false
      this.render()
    })
  }

  /** The JSON of `canonical.messages`, each message converted again only when it changed. */
  readMessages () {
    const raw = []
    for (const item of this.messages.toArray()) {
      if (!(item instanceof Y.Map)) {
        raw.push(item instanceof Y.AbstractType ? item.toJSON() : item)
        continue
      }
      let json = this.rawMessages.get(item)
      if (json === undefined) {
        json = item.toJSON()
        this.rawMessages.set(item, json)
      }
      raw.push(json)
    }
    return raw
  }

  /**
   * Forget the JSON of the messages a transaction changed. Yjs lists every changed type with
   * all its ancestors in `changedParentTypes`, so a message whose text or any nested type
   * changed is there itself. (Not observeDeep: for a 10,000-message sync step 2 it builds and
   * sorts an event per nested type, which doubled the time to apply it.)
   */
  forgetChanged (transaction) {
    for (const type of transaction.changedParentTypes.keys()) {
      if (type._item !== null && type._item.parent === this.messages) this.rawMessages.delete(type)
    }
  }

  render () {
    const follow = this.view.atEnd() || !this.rendered
    this.index = new ThreadIndex(this.readMessages(), parseCached)
    const title = this.meta.get('title')
    this.titleNode.textContent = typeof title === 'string' && title ? title : this.room
    document.title = `${this.titleNode.textContent} · crdtchat`
    if (this.leaf !== null && !this.index.get(this.leaf)) this.leaf = null
    const thread = this.leaf === null ? this.index.currentThread() : this.index.thread(this.leaf)
    this.thread = thread
    this.streamsShown = this.streamsOnThread(thread)
    this.stopButton.hidden = !(this.canWrite && this.streamsShown.length)
    this.view.setItems(thread, follow)
    if (this.shownElements.size > KEEP_NODES) this.forgetHiddenNodes()
    this.syncComposer()
    this.showConnection()
    this.markRead(thread)
    const last = thread[thread.length - 1]
    if (last && last.id !== this.latestDrawn) { // for benchmarks/browser_open.py
      this.latestDrawn = last.id
      performance.mark('crdtchat:latest-drawn', { detail: { id: last.id, messages: thread.length } })
    }
    this.rendered = true
    document.body.dataset.ready = 'true'
  }

  /** Drop the cached nodes of messages scrolled far out of view. */
  forgetHiddenNodes () {
    const [start, end] = this.view.range
    const keep = new Set(this.thread.slice(start, end).map((m) => m.id))
    for (const id of this.shownElements.keys()) if (!keep.has(id)) this.shownElements.delete(id)
  }

  /** The node of a thread message, drawn again only when what it shows has changed. */
  shownNode (message) {
    const key = `${message.content}\u0000${message.status}\u0000${this.siblingKey(message)}\u0000${JSON.stringify(message.files)}\u0000${this.canWrite}`
    let shown = this.shownElements.get(message.id)
    if (!shown || shown.key !== key) {
      shown = { node: this.messageNode(message), key }
      this.shownElements.set(message.id, shown)
    }
    return shown.node
  }

  siblingKey (message) {
    const siblings = message.parent === null ? this.index.accepted.map((p) => this.index.entries[p]).filter((m) => m.parent === null) : this.index.childrenOf(message.parent)
    return `${siblings.findIndex((m) => m.id === message.id)}/${siblings.length}`
  }

  siblings (message) {
    if (message.parent !== null) return this.index.childrenOf(message.parent)
    return this.index.accepted.map((p) => this.index.entries[p]).filter((m) => m.parent === null)
  }

  messageNode (message) {
    const body = h('div', { class: 'body' }, renderMarkdown(message.content))
    const label = statusLabel(message)
    const who = message.role === 'assistant' && message.model ? `${message.model.model}` : message.author
    const meta = h('div', { class: 'meta' }, h('span', { class: 'who', text: `${message.role} · ${who}` }))
    if (label) meta.append(h('span', { class: `status status-${message.status}`, text: label }))
    const node = h('article', { class: `message role-${message.role}`, 'data-id': message.id, 'aria-label': `${message.role} message` }, meta, body)
    if (message.files && message.files.length) node.append(this.filesNode(message.files))
    const actions = h('div', { class: 'actions' })
    const siblings = this.siblings(message)
    if (siblings.length > 1) {
      const at = siblings.findIndex((m) => m.id === message.id)
      actions.append(
        h('button', { type: 'button', 'aria-label': 'Previous branch', disabled: at === 0, onclick: () => this.choose(siblings[at - 1]) }, '‹'),
        h('span', { class: 'branch', text: `${at + 1}/${siblings.length}` }),
        h('button', { type: 'button', 'aria-label': 'Next branch', disabled: at === siblings.length - 1, onclick: () => this.choose(siblings[at + 1]) }, '›'))
    }
    if (this.canWrite && message.role === 'user') {
      actions.append(h('button', { type: 'button', onclick: () => this.edit(message, node) }, 'Edit'))
    }
    if (this.canWrite && message.role === 'assistant' && message.parent !== null) {
      actions.append(h('button', { type: 'button', onclick: () => this.requestRegeneration(message.parent) }, 'Regenerate'))
    }
    node.append(actions)
    return node
  }

  filesNode (files) {
    const list = h('ul', { class: 'files' })
    for (const file of files) {
      const open = h('button', { type: 'button', onclick: () => this.openBlob(file) }, `${file.name} (${file.mime}, ${file.size} bytes)`)
      list.append(h('li', {}, open))
    }
    return list
  }

  async openBlob (file) {
    const response = await fetch(`/blobs/${encodeURIComponent(this.room)}/${file.sha256}`, {
      headers: { Authorization: `Bearer ${this.token}` }
    })
    if (!response.ok) {
      this.notice(`Could not fetch ${file.name}: ${response.status} ${await response.text()}`)
      return
    }
    const url = URL.createObjectURL(new Blob([await response.arrayBuffer()], { type: 'application/octet-stream' }))
    const link = h('a', { href: url, download: file.name })
    link.click()
    setTimeout(() => URL.revokeObjectURL(url), 60000)
  }

  /** The turns streaming a reply to the thread's last message (transport.streams). */
  streamsOnThread (thread) {
    const last = thread[thread.length - 1]
    const turns = []
    if (!last) return turns
    for (const [turnId, stream] of this.streams.entries()) {
      if (!(stream instanceof Y.Map)) continue
      const text = stream.get('text')
      if (!(text instanceof Y.Text) || stream.get('parent') !== last.id || this.index.get(turnId)) continue
      turns.push(turnId)
    }
    return turns
  }

  /** What follows the thread's last message: replies being written, else "waiting". */
  tailNodes () {
    const nodes = []
    for (const turnId of this.streamsShown) {
      const body = h('div', { class: 'body' })
      body.append(renderMarkdown(this.streams.get(turnId).get('text').toString()))
      nodes.push(h('article', { class: 'message role-assistant streaming', 'data-turn': turnId, 'aria-busy': 'true', 'aria-label': 'reply being written' },
        h('div', { class: 'meta' }, h('span', { class: 'who', text: 'assistant · writing…' })), body))
    }
    const thread = this.thread
    const last = thread[thread.length - 1]
    if (!nodes.length && last) {
      const waiting = this.index.waitingForReply(validRegenerate(this.regenerate.toJSON()))
      if (waiting.some((w) => w.message.id === last.id)) nodes.push(h('p', { class: 'waiting', role: 'status', text: 'Waiting for a reply…' }))
    }
    return nodes
  }

  /** The person has seen the thread's last message: the room's `transport.read` (writers
   * only, design §4) and, with an identity token, the person's list (`list.read`, design §2),
   * which a reader can keep too and which the list's unread counts start from. */
  markRead (thread) {
    const last = thread[thread.length - 1]
    if (!last || !this.sub || document.hidden) return
    if (this.canWrite && this.readMarks.get(this.sub) !== last.id) this.readMarks.set(this.sub, last.id)
    if (this.identity) this.markListRead(last.id)
  }

  markListRead (id) {
    if (!this.personList) {
      this.personList = new PersonList(this.token, this.sub)
      this.personList.whenReady.then(() => this.markRead(this.thread))
      return
    }
    this.personList.markRead(this.room, id)
  }

  showConnection () {
    if (!this.connectionNode) return
    const pending = this.pending()
    let text
    if (this.tokenProblem) text = `Access refused: ${this.tokenProblem}. Ask for a new link.`
    else if (!this.online) text = pending ? `offline, ${pending} change${pending === 1 ? '' : 's'} pending` : 'offline'
    else if (pending) text = `online, ${pending} change${pending === 1 ? '' : 's'} pending`
    else text = 'online, all stored'
    this.connectionNode.textContent = text
    this.connectionNode.dataset.state = this.tokenProblem ? 'refused' : this.online ? (pending ? 'pending' : 'stored') : 'offline'
    if (this.refusal) this.notice(`The relay refused a change: ${this.refusal}`)
  }

  notice (text) {
    this.noticeNode.textContent = text
    this.noticeNode.hidden = !text
  }

  showPresence () {
    const states = this.provider.awareness.getStates()
    const mine = []
    const typing = []
    for (const [client, state] of states) {
      if (client === this.doc.clientID || !state || typeof state.user !== 'object' || state.user === null) continue
      const user = state.user
      const sub = typeof user.sub === 'string' ? user.sub.slice(0, 64) : '?'
      const device = typeof user.device === 'string' ? user.device.slice(0, 64) : 'a device'
      if (sub === this.sub) mine.push(device)
      if (user.typing === true) typing.push(sub === this.sub ? `you on ${device}` : sub)
    }
    const parts = []
    if (mine.length) parts.push(`also open on ${mine.join(', ')}`)
    if (typing.length) parts.push(`${typing.join(', ')} typing…`)
    this.presenceNode.textContent = parts.join(' · ')
  }

  // -- the shared draft ---------------------------------------------------------------------

  draftText (create) {
    let text = this.drafts.get(this.sub)
    if (!(text instanceof Y.Text) && create) {
      text = new Y.Text()
      this.drafts.set(this.sub, text)
    }
    return text instanceof Y.Text ? text : null
  }

  onComposerInput () {
    if (!this.canWrite || !this.sub) return
    this.typing(true)
    const text = this.draftText(true)
    this.applyingDraft = true
    try { replaceText(text, this.composer.value) } finally { this.applyingDraft = false }
  }

  syncComposer () {
    if (this.applyingDraft) return
    const text = this.draftText(false)
    const value = text ? text.toString() : ''
    if (this.composer.value === value) return
    const { selectionStart, selectionEnd } = this.composer
    const focused = document.activeElement === this.composer
    this.composer.value = value
    if (focused) this.composer.setSelectionRange(Math.min(selectionStart, value.length), Math.min(selectionEnd, value.length))
  }

  typing (on) {
    if (!this.provider) return
    clearTimeout(this.typingTimer)
    const user = this.provider.awareness.getLocalState()?.user || {}
    if (user.typing !== on) this.provider.awareness.setLocalStateField('user', { ...user, typing: on })
    if (on) this.typingTimer = setTimeout(() => this.typing(false), TYPING_IDLE_MS)
  }

  // -- writes -------------------------------------------------------------------------------

  messageMap (fields) {
    const map = new Y.Map()
    for (const [key, value] of Object.entries(fields)) {
      if (value !== null && value !== undefined) map.set(key, value)
    }
    return map
  }

  send () {
    const content = this.composer.value
    if (!this.canWrite || (!content.trim() && !this.pendingFiles.length)) return
    const parentMessage = this.thread.length ? this.thread[this.thread.length - 1] : null
    const files = this.pendingFiles.length ? this.pendingFiles.map((f) => ({ ...f })) : null
    this.doc.transact(() => {
      this.messages.push([this.messageMap({
        id: newId(),
        role: 'user',
        author: this.sub,
        parent: parentMessage ? parentMessage.id : null,
        created_at: Date.now() / 1000,
        content: new Y.Text(content),
        files
      })])
      const draft = this.draftText(false)
      if (draft && draft.length) draft.delete(0, draft.length)
    })
    this.pendingFiles = []
    this.attachments.replaceChildren()
    this.composer.value = ''
    this.leaf = null
    this.typing(false)
    this.view.toEnd()
  }

  edit (message, node) {
    const area = h('textarea', { 'aria-label': 'Edited message', rows: 3 })
    area.value = message.content
    const save = h('button', { type: 'submit' }, 'Save as new branch')
    const redraw = () => { this.shownElements.delete(message.id); this.render() } // the node holds the form
    const cancel = h('button', { type: 'button', onclick: redraw }, 'Cancel')
    const form = h('form', { class: 'edit', onsubmit: (event) => {
      event.preventDefault()
      this.messages.push([this.messageMap({
        id: newId(),
        role: 'user',
        author: this.sub,
        parent: message.parent,
        created_at: Date.now() / 1000,
        content: new Y.Text(area.value),
        files: message.files
      })])
      this.leaf = null
      redraw()
    } }, area, save, cancel)
    node.querySelector('.body').replaceWith(form)
    area.focus()
  }

  choose (message) {
    this.leaf = this.index.latestLeafUnder(message.id).id
    this.render()
  }

  requestRegeneration (answeredId) {
    const answers = this.index.assistantAnswers(answeredId).length
    const current = validRegenerate(this.regenerate.toJSON())[answeredId]
    const n = Math.max(answers, current ? current.n : 0) + 1
    this.regenerate.set(answeredId, { n, by: this.sub, at: Date.now() / 1000 })
    this.leaf = null
  }

  stop () {
    if (!this.canWrite || !this.streamsShown) return
    for (const turnId of this.streamsShown) this.cancel.set(turnId, { by: this.sub, at: Date.now() / 1000 })
  }

  async attach () {
    for (const file of this.fileInput.files) {
      const buffer = await file.arrayBuffer()
      const sha256 = await sha256Hex(buffer)
      const response = await fetch(`/blobs/${encodeURIComponent(this.room)}/${sha256}`, {
        method: 'PUT',
        headers: { Authorization: `Bearer ${this.token}` },
        body: buffer
      })
      if (response.status !== 201) {
        this.notice(`Could not attach ${file.name}: ${response.status} ${await response.text()}`)
        continue
      }
      const ref = { sha256, name: file.name, mime: file.type || 'application/octet-stream', size: file.size }
      this.pendingFiles.push(ref)
      this.attachments.append(h('li', { text: `${ref.name} (${ref.size} bytes)` }))
    }
    this.fileInput.value = ''
  }

  exportJson () {
    // The portable form of crdtchat.portable: the canonical section, accepted messages only.
    const s = this.settings.toJSON()
    const created = this.meta.get('created_at')
    const messages = this.index.accepted.map((p) => {
      const m = this.index.entries[p]
      return Object.fromEntries(Object.entries(m).filter(([, v]) => v !== null))
    })
    const data = {
      format: 'crdtchat.conversation',
      schema: 1,
      ...(typeof this.meta.get('title') === 'string' ? { title: this.meta.get('title') } : {}),
      ...(typeof created === 'number' ? { created_at: created } : {}),
      settings: s,
      tools: this.doc.getMap('canonical.tools').toJSON(),
      messages
    }
    const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: 'application/json' }))
    h('a', { href: url, download: `${this.room}.json` }).click()
    setTimeout(() => URL.revokeObjectURL(url), 60000)
  }
}

async function main () {
  const root = document.getElementById('app')
  if ('serviceWorker' in navigator && window.isSecureContext) {
    navigator.serviceWorker.register('/static/sw.js', { scope: '/' }).catch(() => {})
  }
  const match = location.pathname.match(/^\/c\/([A-Za-z0-9._-]{1,128})$/)
  const invite = location.pathname.match(/^\/rooms\/([A-Za-z0-9._-]{1,128})\/join$/)
  if (invite) {
    await joinPage(root, invite[1])
    return
  }
  const fromFragment = tokenFromFragment()
  keepIdentity(fromFragment)
  if (!match) {
    const identity = loadIdentity()
    const claims = identity ? decodeClaims(identity) : null
    if (!claims) {
      renderList(root, roomsOpened()) // room tokens name no person: the rooms opened here
      return
    }
    const list = new ListPage(root, identity, claims.sub)
    window.crdtchat = list // for tests and the console
    await list.start()
    return
  }
  const room = match[1]
  const token = fromFragment || loadToken(room)
  if (!token) {
    root.replaceChildren(h('p', { class: 'notice', role: 'alert', text: `No token for ${room} on this device: open the link you were given (it ends with #token=...).` }))
    return
  }
  rememberRoom(room, token)
  const page = new ConversationPage(room, token, root)
  window.crdtchat = page // for tests and the console
  await page.start()
}

main()
