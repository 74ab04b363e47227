// A web client's token refresh (design §3, extension 102) with an unmodified y-websocket
// WebsocketProvider, for tests/interop/test_js_interop_relay.py.
//
//   node refresh_peer.mjs RELAY_URL ROOM TOKEN FRESH_TOKEN WAIT_ID
//
// Connects with `params: {token, ext: 'refresh'}`, and once synced hands FRESH_TOKEN to the
// relay in band. Prints one JSON line per event: {"answer": {accepted, exp | reason}} for the
// relay's type 102 answer, {"closed": {code, reason}} if the relay closes the connection, and
// {"got": WAIT_ID} once a message with that id arrives, then exits.
import WebSocket from 'ws'
import * as Y from 'yjs'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'
import { WebsocketProvider } from 'y-websocket'

const TOKEN_REFRESH = 102
const [url, room, token, fresh, waitId] = process.argv.slice(2)
const doc = new Y.Doc()
const messages = doc.getArray('canonical.messages')
const provider = new WebsocketProvider(url, room, doc, {
  params: { token, ext: 'refresh' },
  WebSocketPolyfill: WebSocket,
  disableBc: true
})
const say = (object) => process.stdout.write(JSON.stringify(object) + '\n')

// Relay to client: varUint8Array(payload), payload = varUint(0) varUint(exp) when accepted,
// varUint(1) varString(reason) when refused.
provider.messageHandlers[TOKEN_REFRESH] = (encoder, decoder) => {
  const payload = decoding.createDecoder(decoding.readVarUint8Array(decoder))
  const status = decoding.readVarUint(payload)
  say({
    answer: status === 0
      ? { accepted: true, exp: decoding.readVarUint(payload) }
      : { accepted: false, reason: decoding.readVarString(payload) }
  })
}

// Client to relay: varUint(102) varUint8Array(varString(token)).
const sendRefresh = (newToken) => {
  const inner = encoding.createEncoder()
  encoding.writeVarString(inner, newToken)
  const encoder = encoding.createEncoder()
  encoding.writeVarUint(encoder, TOKEN_REFRESH)
  encoding.writeVarUint8Array(encoder, encoding.toUint8Array(inner))
  provider.ws.send(encoding.toUint8Array(encoder))
}

provider.on('connection-close', (event) => {
  if (event != null) say({ closed: { code: event.code, reason: event.reason.toString() } })
})
provider.on('sync', (synced) => {
  if (synced) sendRefresh(fresh)
})
const check = () => {
  if (messages.toArray().some((m) => m.get('id') === waitId)) {
    say({ got: waitId })
    provider.destroy()
    process.exit(0)
  }
}
doc.on('update', check)
