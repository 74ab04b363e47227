// Reads a person's list document as the web page does, for tests/web/test_web_list.py: one JSON
// line in ({update: base64 of a Yjs update}), one JSON line out (listdoc.js `listEntries` of
// all entries), until stdin ends. The document is read by yjs itself, as the page reads it.
import * as Y from 'yjs'
import { createInterface } from 'node:readline'
import { listEntries } from '../../web/src/listdoc.js'

const lines = createInterface({ input: process.stdin })
for await (const line of lines) {
  let answer
  try {
    const doc = new Y.Doc()
    Y.applyUpdate(doc, Buffer.from(JSON.parse(line).update, 'base64'))
    answer = { all: listEntries(doc, null), current: listEntries(doc).map((e) => e.room) }
  } catch (error) {
    answer = { error: String(error && error.stack) }
  }
  process.stdout.write(JSON.stringify(answer) + '\n')
}
