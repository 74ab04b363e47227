// Tokens and the rooms this device has opened. A token arrives in the URL fragment
// (#token=..., never the query string, so no server or proxy logs it), is kept in this
// browser's localStorage, and is removed from the address bar at once. An identity token
// (design §4: a person, no room) is kept once for every room, and opens the person's list.
import { digest } from 'lib0/hash/sha256'
import { toHexString } from 'lib0/buffer'

const TOKEN_KEY = (room) => `crdtchat.token.${room}`
const ROOMS_KEY = 'crdtchat.rooms'
const IDENTITY_KEY = 'crdtchat.identity'

/** The token of the URL fragment, if any; the fragment is cleared from the address bar. */
export function tokenFromFragment () {
  const params = new URLSearchParams(location.hash.slice(1))
  const token = params.get('token')
  if (token) history.replaceState(null, '', location.pathname)
  return token
}

/** The room's own token, else this device's identity token (a member's, design §4). */
export function loadToken (room) {
  return localStorage.getItem(TOKEN_KEY(room)) || loadIdentity()
}

/** Whether claims are an identity token's: no room and no role (design §4). */
export function isIdentity (claims) {
  return claims !== null && claims.room == null && claims.role == null
}

export function loadIdentity () {
  return localStorage.getItem(IDENTITY_KEY)
}

/** Keep `token` as this device's identity token if it is one; returns whether it was. */
export function keepIdentity (token) {
  if (!token || !isIdentity(decodeClaims(token))) return false
  localStorage.setItem(IDENTITY_KEY, token)
  return true
}

/** The room of `sub`'s list document: `person.` and 40 hex of SHA-256 (crdtchat.schema). */
export function personRoom (sub) {
  const hash = digest(new TextEncoder().encode(sub))
  return 'person.' + toHexString(hash).slice(0, 40)
}

/** The claims a token carries (unverified: the relay checks them, this only shows them). */
export function decodeClaims (token) {
  try {
    const payload = token.split('.')[1]
    const json = atob(payload.replace(/-/g, '+').replace(/_/g, '/'))
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(json, (c) => c.charCodeAt(0))))
    return typeof claims === 'object' && claims !== null && typeof claims.sub === 'string' ? claims : null
  } catch {
    return null
  }
}

/**
 * The rooms this device has opened, newest first. The conversation list reads only this
 * function: a per-person list document (issue 14) replaces its source, not the list page.
 */
export function roomsOpened () {
  try {
    const rooms = JSON.parse(localStorage.getItem(ROOMS_KEY) || '[]')
    return Array.isArray(rooms) ? rooms.filter((r) => r && typeof r.room === 'string') : []
  } catch {
    return []
  }
}

export function rememberRoom (room, token) {
  localStorage.setItem(TOKEN_KEY(room), token)
  const rooms = roomsOpened().filter((r) => r.room !== room)
  rooms.unshift({ room, opened: Date.now() })
  localStorage.setItem(ROOMS_KEY, JSON.stringify(rooms.slice(0, 500)))
}

/**
 * Whether the relay accepts `token` for `room`: {ok, claims} or {ok: false, reason}.
 * A browser cannot read the status of a refused websocket upgrade (it sees 1006), so the page
 * asks here. Throws when the relay cannot be reached (offline).
 */
export async function checkToken (room, token) {
  const response = await fetch(`/auth/${encodeURIComponent(room)}`, {
    headers: { Authorization: `Bearer ${token}` },
    cache: 'no-store'
  })
  if (response.ok) return { ok: true, claims: await response.json() }
  if (response.status === 401 || response.status === 403) {
    return { ok: false, reason: (await response.text()).trim() }
  }
  throw new Error(`the relay answered ${response.status}`)
}

/**
 * Whether the person of an identity token is still a member of `room`: {ok} or {ok: false,
 * reason}. /auth accepts any good identity token (membership gives the role, design §4), so
 * after a refused connection the page asks the room's summary, which only members may read.
 * Throws when the relay cannot be reached.
 */
export async function checkMember (room, token) {
  const response = await relayRequest('GET', `/rooms/${encodeURIComponent(room)}/summary`, token)
  if (response.status === 403) return { ok: false, reason: (await response.text()).trim() }
  return { ok: true }
}

/** A request to the relay with the token in `Authorization`; `body`, if any, as JSON. */
export async function relayRequest (method, path, token, body) {
  const headers = { Authorization: `Bearer ${token}` }
  if (body !== undefined) headers['Content-Type'] = 'application/json'
  return fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store'
  })
}
