// An unmodified Yjs peer for the document interop tests (tests/interop/test_js_document.py).
//
//   node doc_interop.mjs read-append IN OUT   apply IN, report what was read (stdout, JSON),
//                                              append a message and edit text, write the
//                                              incremental update to OUT
//   node doc_interop.mjs create OUT            create a conversation from scratch, write it
//   node doc_interop.mjs dump IN [IN...]       apply the updates in order, report (stdout, JSON)
//
// Roots are read by their names from design §2, as any JS client would.
import { readFileSync, writeFileSync } from 'node:fs'
import * as Y from 'yjs'

const MAP_ROOTS = [
  'canonical.meta', 'canonical.settings', 'canonical.tools', 'derived.entries',
  'transport.leases', 'transport.streams', 'transport.cancel', 'transport.regenerate',
  'transport.drafts', 'transport.read'
]

// Plain data plus the Yjs type of every shared value, so Python can check the types too.
const describe = (value) => {
  if (value instanceof Y.Text) return { type: 'Y.Text', text: value.toString(), utf16Length: value.length }
  if (value instanceof Y.Map) {
    const out = {}
    value.forEach((v, k) => { out[k] = describe(v) })
    return { type: 'Y.Map', entries: out }
  }
  if (value instanceof Y.Array) return { type: 'Y.Array', items: value.toArray().map(describe) }
  return { type: 'json', value }
}

const report = (doc) => {
  const roots = {}
  for (const name of MAP_ROOTS) roots[name] = describe(doc.getMap(name)).entries
  return {
    roots,
    messages: doc.getArray('canonical.messages').toArray().map(describe)
  }
}

const load = (paths) => {
  const doc = new Y.Doc()
  for (const path of paths) Y.applyUpdate(doc, new Uint8Array(readFileSync(path)))
  return doc
}

const newMessage = (fields, text) => {
  const map = new Y.Map()
  for (const [key, value] of Object.entries(fields)) map.set(key, value)
  map.set('content', new Y.Text(text))
  return map
}

const [command, ...args] = process.argv.slice(2)

if (command === 'read-append') {
  const [input, output] = args
  const doc = load([input])
  const before = report(doc)
  const vector = Y.encodeStateVector(doc)
  const messages = doc.getArray('canonical.messages')
  const last = messages.get(messages.length - 1)
  doc.transact(() => {
    messages.push([newMessage({
      id: 'js-1', role: 'user', author: 'js-peer', parent: last.get('id'), created_at: Date.now() / 1000
    }, 'from JS 😀 with 𝄞')])
    // Edit the text of the message Python wrote as "ab😀cd𝄞": Yjs counts UTF-16 units,
    // so the emoji spans offsets 2..3 and 4 is just after it.
    const target = messages.toArray().find((m) => m.get('id') === 'edit-me')
    const text = target.get('content')
    text.insert(4, '[js]')
    // delete the "d" (UTF-16 offset 9 after the insert), keep the astral char after it
    text.delete(9, 1)
  })
  writeFileSync(output, Y.encodeStateAsUpdate(doc, vector))
  process.stdout.write(JSON.stringify(before))
} else if (command === 'create') {
  const [output] = args
  const doc = new Y.Doc()
  doc.transact(() => {
    const meta = doc.getMap('canonical.meta')
    meta.set('schema', 1)
    meta.set('created_at', 1700000000.5)
    meta.set('title', 'Made in JS 😀')
    const settings = doc.getMap('canonical.settings')
    settings.set('system', 'Answer in French.')
    settings.set('params', { temperature: 0.5 })
    doc.getMap('canonical.tools').set('lookup', { description: 'Look up', parameters: { type: 'object' } })
    const messages = doc.getArray('canonical.messages')
    messages.push([newMessage({ id: 'js-sys', role: 'system', author: 'js-peer', parent: null, created_at: 1700000001 }, 'Be brief.')])
    messages.push([newMessage({ id: 'js-user', role: 'user', author: 'js-peer', parent: 'js-sys', created_at: 1700000002.25 }, 'ab😀cd𝄞 é')])
    doc.getMap('transport.drafts').set('js-peer', new Y.Text('typing 😀'))
  })
  writeFileSync(output, Y.encodeStateAsUpdate(doc))
} else if (command === 'dump') {
  process.stdout.write(JSON.stringify(report(load(args))))
} else {
  process.stderr.write(`unknown command ${command}\n`)
  process.exit(2)
}
