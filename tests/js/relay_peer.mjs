// An unmodified y-websocket client (WebsocketProvider) for tests/interop/test_js_interop_relay.py.
//
//   node relay_peer.mjs RELAY_URL ROOM TOKEN SUB DEVICE
//
// Connects through the relay with `new WebsocketProvider(url, room, doc, {params: {token}})`,
// announces {user: SUB, device: DEVICE} as its awareness state, then takes one JSON command per
// line on stdin and answers with one JSON line on stdout. Waiting commands are woken by the
// document's or the awareness' own events, never by polling:
//   {"cmd": "append", "id", "text"}            append a user message authored by SUB
//   {"cmd": "append_text", "id", "text"}       append to the content of message `id`
//   {"cmd": "wait_messages", "contents": {id: text}}   until those messages hold those texts
//   {"cmd": "wait_peer", "match": {...}}       until another client's presence has all these
//                                              key/values
//   {"cmd": "wait_no_peer", "match": {...}}    until no other client's presence has them
//   {"cmd": "state"}                           messages and the others' presence
//   {"cmd": "close"}                           destroy the provider and exit
import { createInterface } from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const [url, room, token, sub, device] = process.argv.slice(2)
const doc = new Y.Doc()
const messages = doc.getArray('canonical.messages')
const provider = new WebsocketProvider(url, room, doc, {
  params: { token },
  WebSocketPolyfill: WebSocket,
  disableBc: true
})
provider.awareness.setLocalState({ user: sub, device })

const say = (object) => process.stdout.write(JSON.stringify(object) + '\n')

const contents = () => {
  const out = {}
  for (const m of messages.toArray()) {
    const content = m.get('content')
    out[m.get('id')] = {
      author: m.get('author'),
      role: m.get('role'),
      text: content instanceof Y.Text ? content.toString() : null
    }
  }
  return out
}

const peers = () => {
  const out = []
  provider.awareness.getStates().forEach((state, clientID) => {
    if (clientID !== doc.clientID) out.push({ clientID, state })
  })
  return out
}

const matches = (state, match) =>
  state != null && Object.entries(match).every(([key, value]) => state[key] === value)
const hasPeer = (match) => peers().some(({ state }) => matches(state, match))

// Resolve when `check()` holds, re-checking on every document and awareness change.
const until = (check) => new Promise((resolve) => {
  if (check()) return resolve()
  const recheck = () => {
    if (check()) {
      doc.off('update', recheck)
      provider.awareness.off('change', recheck)
      resolve()
    }
  }
  doc.on('update', recheck)
  provider.awareness.on('change', recheck)
})

const findMessage = (id) => messages.toArray().find((m) => m.get('id') === id)

const handle = async (command) => {
  switch (command.cmd) {
    case 'append': {
      doc.transact(() => {
        const m = new Y.Map()
        m.set('id', command.id)
        m.set('role', 'user')
        m.set('author', sub)
        m.set('parent', null)
        m.set('created_at', Date.now() / 1000)
        m.set('content', new Y.Text(command.text))
        messages.push([m])
      })
      return { ok: 'append' }
    }
    case 'append_text': {
      const text = findMessage(command.id).get('content')
      text.insert(text.length, command.text) // Yjs offsets are UTF-16 units
      return { ok: 'append_text' }
    }
    case 'wait_messages': {
      const wanted = Object.entries(command.contents)
      await until(() => {
        const now = contents()
        return wanted.every(([id, text]) => now[id] && now[id].text === text)
      })
      return { ok: 'wait_messages', contents: contents() }
    }
    case 'wait_peer':
      await until(() => hasPeer(command.match))
      return { ok: 'wait_peer', peers: peers() }
    case 'wait_no_peer':
      await until(() => !hasPeer(command.match))
      return { ok: 'wait_no_peer', peers: peers() }
    case 'state':
      return { ok: 'state', contents: contents(), peers: peers(), synced: provider.synced }
    case 'close':
      provider.destroy()
      setTimeout(() => process.exit(0), 50) // let the close frame go out
      return { ok: 'close' }
    default:
      return { error: `unknown command ${command.cmd}` }
  }
}

provider.on('sync', (synced) => { if (synced) say({ event: 'synced' }) })
provider.on('connection-close', (event) => {
  say({ event: 'connection-close', code: event && event.code, reason: event && event.reason })
})

// Commands run one at a time, in order.
let queue = Promise.resolve()
createInterface({ input: process.stdin }).on('line', (line) => {
  if (!line.trim()) return
  queue = queue.then(async () => {
    try {
      say(await handle(JSON.parse(line)))
    } catch (error) {
      say({ error: String(error && error.stack ? error.stack : error) })
    }
  })
})
