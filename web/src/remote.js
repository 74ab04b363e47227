// Applying what the relay sends without Yjs encoding it a second time (design §6, Web client).
// Yjs re-encodes every transaction for its 'update' listeners. Here those are y-indexeddb
// (which stores the bytes), the websocket provider (which ignores its own origin) and the page
// (which counts only its own edits), so for an update that came from the relay the bytes
// received say all they need: handing those over saved ~150 ms of opening a 10,000-message
// conversation (docs/performance.md, "Web client"). Relies on lib0's ObservableV2 keeping its
// listeners in `_observers` and on y-indexeddb's `_storeUpdate` (both pinned in package.json).
import * as Y from 'yjs'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'
import * as syncProtocol from 'y-protocols/sync'
import { storeState } from 'y-indexeddb'

export const MESSAGE_SYNC = 0 // y-websocket's message type of the sync protocol

/** Apply `update` with `origin`, then give the received bytes to the 'update' listeners. */
export function applyRemoteUpdate (doc, update, origin) {
  const listeners = doc._observers.get('update')
  doc._observers.delete('update')
  try {
    Y.applyUpdate(doc, update, origin)
  } finally {
    const added = doc._observers.get('update') // registered while the update was applied
    if (listeners) {
      if (added) for (const listener of added) listeners.add(listener)
      doc._observers.set('update', listeners)
    }
  }
  if (listeners) for (const listener of [...listeners]) listener(update, origin, doc, null)
}

/** y-websocket's sync message handler, with updates applied by `applyRemoteUpdate`. */
export function syncHandler (encoder, decoder, provider, emitSynced) {
  encoding.writeVarUint(encoder, MESSAGE_SYNC)
  const type = decoding.readVarUint(decoder)
  if (type === syncProtocol.messageYjsSyncStep1) {
    syncProtocol.readSyncStep1(decoder, encoder, provider.doc)
  } else if (type === syncProtocol.messageYjsSyncStep2 || type === syncProtocol.messageYjsUpdate) {
    const update = decoding.readVarUint8Array(decoder)
    const first = type === syncProtocol.messageYjsSyncStep2 && !provider.synced
    if (first) performance.mark('crdtchat:relay-state-received', { detail: update.length })
    try {
      applyRemoteUpdate(provider.doc, update, provider)
      if (first) performance.mark('crdtchat:relay-state-applied')
    } catch (error) {
      // as y-protocols does: an observer's exception must not close the connection
      console.error('Caught error while handling a Yjs update', error)
    }
  } else {
    throw new Error('Unknown message type')
  }
  if (emitSynced && type === syncProtocol.messageYjsSyncStep2 && !provider.synced) provider.synced = true
}

/**
 * Load `idb.doc` from IndexedDB without encoding the loaded state for 'update' listeners
 * (nobody needs it: y-indexeddb skips its own origin). Its store listener is off while it
 * loads, so the caller registers its own 'update' listener afterwards; a local edit made
 * meanwhile is written by a full store. Returns whether there was one.
 */
export async function loadFromIndexedDb (idb) {
  const doc = idb.doc
  doc.off('update', idb._storeUpdate)
  let editedMeanwhile = false
  const watch = (transaction) => { if (transaction.origin !== idb) editedMeanwhile = true }
  doc.on('afterTransaction', watch)
  try {
    await idb.whenSynced
  } finally {
    doc.off('afterTransaction', watch)
    doc.on('update', idb._storeUpdate)
  }
  if (editedMeanwhile) storeState(idb, true)
  return editedMeanwhile
}
