// The reading rules of design §2, exactly as the Python `Conversation` applies them
// (crdtchat/schema.py `Message`, crdtchat/view.py `ThreadIndex`, crdtchat/document.py
// `waiting_for_reply`). Any peer can write anything into the document, so every value is
// validated, a bad message is skipped and reported, and every replica shows the same thing.
// tests/test_web_rules.py feeds the same documents to both and compares what they show.

const ROLES = new Set(['system', 'user', 'assistant', 'tool'])
const STATUSES = new Set(['complete', 'incomplete', 'cancelled', 'error'])
const SHA256 = /^[0-9a-f]{64}$/
// pydantic's lax float and int parsing of strings (Python's float() syntax, stripped)
const FLOAT_TEXT = /^\s*[+-]?(?:(?:(?:\d(?:_?\d)*)?\.\d(?:_?\d)*|\d(?:_?\d)*\.?)(?:[eE][+-]?\d(?:_?\d)*)?|inf|infinity|nan)\s*$/i
const INT_TEXT = /^\s*[+-]?\d(?:_?\d)*(?:\.0*)?\s*$/
const MAX_INT = 2 ** 63

export class Invalid extends Error {}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v)

function str (raw, key, { optional = false, nonEmpty = false } = {}) {
  const v = raw[key]
  if (v === undefined || v === null) {
    if (optional) return null
    throw new Invalid(`invalid ${key}: ${v === undefined ? 'Field required' : 'Input should be a valid string'}`)
  }
  if (typeof v !== 'string') throw new Invalid(`invalid ${key}: Input should be a valid string`)
  if (nonEmpty && v.length === 0) throw new Invalid(`invalid ${key}: String should have at least 1 character`)
  return v
}

function float (v, key) {
  if (typeof v === 'number') return v
  if (typeof v === 'boolean') return v ? 1 : 0
  if (typeof v === 'string' && FLOAT_TEXT.test(v)) return Number(v.trim().replaceAll('_', '').replace(/^([+-]?)inf(inity)?$/i, '$1Infinity'))
  throw new Invalid(`invalid ${key}: Input should be a valid number`)
}

function int (v, key) {
  if (typeof v === 'boolean') return v ? 1 : 0
  if (typeof v === 'number' && Number.isInteger(v) && Math.abs(v) < MAX_INT) return v
  if (typeof v === 'string' && INT_TEXT.test(v)) return Number(v.trim().replaceAll('_', ''))
  throw new Invalid(`invalid ${key}: Input should be a valid integer`)
}

function list (v, key, item) {
  if (v === undefined || v === null) return null
  if (!Array.isArray(v)) throw new Invalid(`invalid ${key}: Input should be a valid tuple`)
  return v.map((x) => {
    if (!isObject(x)) throw new Invalid(`invalid ${key}: Input should be an object`)
    return item(x)
  })
}

/** A message as `crdtchat.schema.Message` validates it, or throws `Invalid`. */
export function parseMessage (raw) {
  if (!isObject(raw)) throw new Invalid('invalid message: Input should be an object')
  const id = str(raw, 'id', { nonEmpty: true })
  const role = raw.role
  if (typeof role !== 'string' || !ROLES.has(role)) throw new Invalid('invalid role: Input should be a role')
  const author = str(raw, 'author')
  const parent = str(raw, 'parent', { optional: true })
  const createdAt = raw.created_at === undefined ? 0 : float(raw.created_at, 'created_at')
  const content = raw.content === undefined ? '' : str(raw, 'content')
  const toolCalls = list(raw.tool_calls, 'tool_calls', (c) => ({
    id: str(c, 'id', { nonEmpty: true }),
    name: str(c, 'name', { nonEmpty: true }),
    arguments: str(c, 'arguments')
  }))
  const toolCallId = str(raw, 'tool_call_id', { optional: true })
  const files = list(raw.files, 'files', (f) => {
    const sha256 = str(f, 'sha256')
    if (!SHA256.test(sha256)) throw new Invalid('invalid files.sha256: String should match pattern')
    if (f.size === undefined) throw new Invalid('invalid files.size: Field required')
    const size = int(f.size, 'files.size')
    if (size < 0) throw new Invalid('invalid files.size: Input should be greater than or equal to 0')
    return { sha256, name: str(f, 'name'), mime: str(f, 'mime'), size }
  })
  let model = null
  if (raw.model !== undefined && raw.model !== null) {
    if (!isObject(raw.model)) throw new Invalid('invalid model: Input should be an object')
    model = { provider: str(raw.model, 'provider'), api: str(raw.model, 'api'), model: str(raw.model, 'model') }
  }
  const status = raw.status === undefined || raw.status === null ? null : raw.status
  if (status !== null && (typeof status !== 'string' || !STATUSES.has(status))) {
    throw new Invalid('invalid status: Input should be a status')
  }
  const error = str(raw, 'error', { optional: true })
  return { id, role, author, parent, created_at: createdAt, content, tool_calls: toolCalls, tool_call_id: toolCallId, files, model, status, error }
}

const parsed = new WeakMap() // a message's JSON object -> {message} or {error}

/**
 * `parseMessage`, remembered per JSON object: the page converts a message to JSON again only
 * when it changed, so an unchanged message is validated once, not on every frame.
 */
export function parseCached (raw) {
  if (raw === null || typeof raw !== 'object') return parseMessage(raw)
  let result = parsed.get(raw)
  if (result === undefined) {
    try {
      result = { message: parseMessage(raw) }
    } catch (error) {
      if (!(error instanceof Invalid)) throw error
      result = { error }
    }
    parsed.set(raw, result)
  }
  if (result.error) throw result.error
  return result.message
}

/**
 * The thread index of `crdtchat.view.ThreadIndex` over the JSON of `canonical.messages`:
 * which entries count (first id wins, parents must come earlier), how they link, and why the
 * others are skipped.
 */
export class ThreadIndex {
  /** `parse` is `parseMessage` or one with the same answers (`parseCached`). */
  constructor (rawMessages, parse = parseMessage) {
    this.parse = parse
    this.entries = [] // message or null, by position
    this.accepted = [] // positions, document order
    this.positionOf = new Map()
    this.children = new Map()
    this.leaves = new Map() // ordered: document order
    this.problems = new Map() // position -> reason
    this.claimed = new Map() // every well-formed id -> first position
    rawMessages.forEach((raw, position) => this.admit(position, raw))
  }

  admit (position, raw) {
    let message
    try {
      message = this.parse(raw)
    } catch (error) {
      if (!(error instanceof Invalid)) throw error
      this.entries.push(null)
      this.problems.set(position, error.message)
      return
    }
    this.entries.push(message)
    const id = message.id
    if (!this.claimed.has(id)) this.claimed.set(id, position)
    if (this.positionOf.has(id)) {
      this.problems.set(position, `duplicate id '${id}'`)
      return
    }
    const parent = message.parent
    if (parent !== null && !this.positionOf.has(parent)) {
      this.problems.set(position, `dangling parent '${parent}'`)
      return
    }
    this.accepted.push(position)
    this.positionOf.set(id, position)
    this.leaves.set(id, null)
    if (parent !== null) {
      const siblings = this.children.get(parent)
      if (siblings === undefined) this.children.set(parent, [id])
      else siblings.push(id)
      this.leaves.delete(parent)
    }
  }

  get size () { return this.accepted.length }

  get (id) {
    const position = this.positionOf.get(id)
    return position === undefined ? null : this.entries[position]
  }

  last () {
    const n = this.accepted.length
    return n ? this.entries[this.accepted[n - 1]] : null
  }

  /** Root to `leafId` inclusive. */
  thread (leafId) {
    let message = this.get(leafId)
    const path = []
    while (message !== null) {
      path.push(message)
      message = message.parent === null ? null : this.get(message.parent)
    }
    return path.reverse()
  }

  /** The current thread: the path to the last message in document order (design §2). */
  currentThread () {
    const last = this.last()
    return last === null ? [] : this.thread(last.id)
  }

  childrenOf (id) { return (this.children.get(id) || []).map((c) => this.get(c)) }

  assistantAnswers (id) { return this.childrenOf(id).filter((m) => m.role === 'assistant') }

  /** The latest leaf under `id`: the thread shown when a branch is chosen. */
  latestLeafUnder (id) {
    let best = id
    for (const leafId of this.leaves.keys()) {
      if (this.thread(leafId).some((m) => m.id === id)) best = leafId
    }
    return this.get(best)
  }

  problemList () {
    return [...this.problems.entries()].sort((a, b) => a[0] - b[0]).map(([key, reason]) => ({ key, reason }))
  }

  _freeAnswerNumber (id, number) {
    while (this.claimed.has(`${id}~a${number}`)) number++
    return number
  }

  _toolResultsComplete (toolMessage) {
    const answered = new Set()
    let message = toolMessage
    while (message !== null && message.role === 'tool') {
      if (message.tool_call_id !== null) answered.add(message.tool_call_id)
      message = message.parent === null ? null : this.get(message.parent)
    }
    if (message === null || message.role !== 'assistant' || !message.tool_calls || message.tool_calls.length === 0) return true
    return message.tool_calls.every((call) => answered.has(call.id))
  }

  /**
   * Messages waiting for a reply, in document order, with their answer numbers
   * (`Conversation.waiting_for_reply`); `regenerate` is the JSON of `transport.regenerate`.
   */
  waitingForReply (regenerate = {}) {
    const waiting = []
    for (const leafId of this.leaves.keys()) {
      const message = this.get(leafId)
      if (message.role === 'user' || (message.role === 'tool' && this._toolResultsComplete(message))) {
        waiting.push({ message, answer: this._freeAnswerNumber(message.id, 1) })
      }
    }
    const already = new Set(waiting.map((w) => w.message.id))
    for (const [id, request] of Object.entries(validRegenerate(regenerate))) {
      const message = this.get(id)
      if (message === null || !(message.role === 'user' || message.role === 'tool') || already.has(id)) continue
      const answers = this.assistantAnswers(id).length
      if (request.n > answers) waiting.push({ message, answer: this._freeAnswerNumber(id, answers + 1) })
    }
    waiting.sort((a, b) => this.positionOf.get(a.message.id) - this.positionOf.get(b.message.id))
    return waiting
  }
}

/** The entries of `transport.regenerate` that `RegenerateRequest` accepts. */
export function validRegenerate (raw) {
  const result = {}
  if (!isObject(raw)) return result
  for (const [key, value] of Object.entries(raw)) {
    try {
      if (!isObject(value)) continue
      const n = int(value.n, 'n')
      if (value.n === undefined || n < 1) continue
      if (typeof value.by !== 'string' || value.at === undefined || value.at === null) continue
      float(value.at, 'at')
      result[key] = { n, by: value.by, at: value.at }
    } catch (error) {
      if (!(error instanceof Invalid)) throw error
    }
  }
  return result
}

/** What a reader shows of a document's messages: what the differential test compares. */
export function shown (rawMessages, regenerate = {}) {
  const index = new ThreadIndex(rawMessages)
  return {
    thread: index.currentThread().map((m) => ({ id: m.id, role: m.role, content: m.content, status: m.status })),
    accepted: index.accepted.map((p) => index.entries[p].id),
    problems: index.problemList().map((p) => p.key),
    waiting: index.waitingForReply(regenerate).map((w) => [w.message.id, w.answer])
  }
}

/** How a message's status reads to a person: a reply cut at the token limit is incomplete. */
export function statusLabel (message) {
  switch (message.status) {
    case 'incomplete': return 'incomplete (cut at the token limit)'
    case 'cancelled': return 'stopped'
    case 'error': return `error: ${message.error || 'no reason given'}`
    default: return ''
  }
}
