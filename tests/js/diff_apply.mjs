// Differential oracle: apply pycrdt-written update bytes in Yjs and print what Yjs reads.
//
// Input: path of a JSON file holding a list of cases {updates: [base64], roots: {name: kind}}
// with kind "map" or "array". Output on stdout: one JSON list with, per case,
// {roots: {name: json}, state_vector: {client: clock}, state: base64 of Yjs's own encoding}.
// Many cases in one process: starting node costs far more than applying a few updates.
import { readFileSync } from 'node:fs'
import * as Y from 'yjs'

const toBytes = (b64) => new Uint8Array(Buffer.from(b64, 'base64'))
// pycrdt never writes bigints, but a foreign peer could: print them as numbers, not crash
const replacer = (_key, value) => (typeof value === 'bigint' ? Number(value) : value)

const cases = JSON.parse(readFileSync(process.argv[2], 'utf8'))
const results = cases.map(({ updates, roots }) => {
  const doc = new Y.Doc()
  for (const update of updates) Y.applyUpdate(doc, toBytes(update))
  const json = {}
  for (const [name, kind] of Object.entries(roots)) {
    json[name] = (kind === 'array' ? doc.getArray(name) : doc.getMap(name)).toJSON()
  }
  const stateVector = {}
  for (const [client, clock] of Y.decodeStateVector(Y.encodeStateVector(doc))) {
    stateVector[client] = clock
  }
  const state = Buffer.from(Y.encodeStateAsUpdate(doc)).toString('base64')
  return { roots: json, state_vector: stateVector, state }
})
process.stdout.write(JSON.stringify(results, replacer))
