// Redeeming an invite link in the browser (design §4, sharing; design §6, Web client). The
// link is /rooms/<room>/join#invite=<secret>: the secret rides in the fragment, which the
// browser never sends, and the page POSTs it to the same path with this device's identity
// token (a person's, kept from their sign-in link). The relay makes the person a member; the
// page puts the room in the person's list, as `crdtchat join` does, and opens it.
import { h } from './dom.js'
import { loadIdentity, decodeClaims, relayRequest } from './session.js'
import { ListPage } from './list.js'

const SECRET_KEY = (room) => `crdtchat.invite.${room}`
const LIST_SYNC_MS = 5000 // waiting this long for the list document before adding to it anyway

function secretFromFragment (room) {
  const secret = new URLSearchParams(location.hash.slice(1)).get('invite')
  if (secret) {
    // kept for this tab only (a reload after signing in), and off the address bar at once
    sessionStorage.setItem(SECRET_KEY(room), secret)
    history.replaceState(null, '', location.pathname)
  }
  return secret || sessionStorage.getItem(SECRET_KEY(room))
}

export async function joinPage (root, room) {
  const status = h('p', { role: 'status', class: 'joining', text: `Joining ${room}…` })
  const problem = h('p', { class: 'notice', role: 'alert', hidden: true })
  root.replaceChildren(h('h1', { text: 'Invitation' }), status, problem)
  const fail = (text) => {
    status.textContent = ''
    problem.textContent = text
    problem.hidden = false
    document.body.dataset.ready = 'true'
  }
  const secret = secretFromFragment(room)
  if (!secret) return fail('This invite link has no secret: it must end with #invite=...')
  const identity = loadIdentity()
  const claims = identity ? decodeClaims(identity) : null
  if (!claims) {
    return fail('To accept an invitation, this browser needs your sign-in link first: open the link ' +
      '`crdtchat token --sub YOU --link URL` printed for you, then this invite link again.')
  }
  let answer
  try {
    answer = await relayRequest('POST', `/rooms/${encodeURIComponent(room)}/join`, identity, { secret })
  } catch {
    return fail('The relay cannot be reached: accepting an invitation needs to be online.')
  }
  if (!answer.ok) return fail(`Could not join ${room}: ${(await answer.text()).trim()}`)
  sessionStorage.removeItem(SECRET_KEY(room))
  const { role } = await answer.json()
  status.textContent = `Joined ${room} as ${role}; adding it to your conversations…`
  await addToList(identity, claims.sub, room)
  location.replace(`/c/${encodeURIComponent(room)}`)
}

/** Put `room` in the person's list document: stored in IndexedDB, and sent if the list
 * syncs in time (otherwise the list page sends it on its next visit). */
async function addToList (identity, sub, room) {
  const list = new ListPage(h('div'), identity, sub)
  await list.start()
  if (!list.provider.synced) {
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, LIST_SYNC_MS)
      list.provider.once('sync', () => { clearTimeout(timer); resolve() })
    })
  }
  list.add(room, null)
  await list.stored()
}
