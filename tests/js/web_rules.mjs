// Reads what the web client shows of documents, for tests/web/test_web_rules.py: one JSON line in
// ({update: base64 of a Yjs update}), one JSON line out (rules.js `shown`), until stdin ends.
// The document is read by yjs itself, as the page reads it, not from JSON made by Python.
import * as Y from 'yjs'
import { createInterface } from 'node:readline'
import { shown } from '../../web/src/rules.js'

const lines = createInterface({ input: process.stdin })
for await (const line of lines) {
  let answer
  try {
    const doc = new Y.Doc()
    Y.applyUpdate(doc, Buffer.from(JSON.parse(line).update, 'base64'))
    answer = shown(doc.getArray('canonical.messages').toJSON(), doc.getMap('transport.regenerate').toJSON())
  } catch (error) {
    answer = { error: String(error && error.stack) }
  }
  process.stdout.write(JSON.stringify(answer) + '\n')
}
