// A virtual list for the thread (design §6, Web client): only the messages in or near the
// viewport are in the DOM, whatever the thread's length, so opening a 10,000-message
// conversation draws one screenful and scrolling back stays smooth. Heights are measured as
// messages are drawn and estimated (the mean of those measured) for the others; the space of
// the messages not drawn is the list's top and bottom padding. When a measurement changes the
// heights above the viewport, the first visible message keeps its place on screen.

const OVERSCAN = 600 // px drawn beyond each edge of the viewport
const FIRST_ESTIMATE = 96 // px per message before any has been measured
const BOTTOM_SLACK = 80 // px: this close to the end counts as following the latest message

export class VirtualList {
  /**
   * `scroller` scrolls; `list` (inside it) holds the drawn nodes. `node(item, index)` returns the
   * DOM node of an item (the caller caches them); `tail()` returns nodes shown after the last
   * item (a reply being written, "waiting"), drawn only when the end is in view.
   */
  constructor (scroller, list, { id, node, tail }) {
    this.scroller = scroller
    this.list = list
    this.id = id
    this.node = node
    this.tail = tail
    this.items = []
    this.indexOf = new Map()
    this.heights = new Map() // item id -> px, including the gap after it
    this.measuredTotal = 0
    this.offsets = new Float64Array(1)
    this.range = [0, 0]
    this.drawn = []
    this.scheduled = false
    this.drawing = false
    this.draws = 0 // how many times the DOM was replaced: for tests and the benchmark
    this.drawMs = 0 // how long the last draw took, layout included
    scroller.addEventListener('scroll', () => { if (!this.drawing) this.schedule() })
    window.addEventListener('resize', () => { this.heights.clear(); this.measuredTotal = 0; this.schedule() })
  }

  /** Whether the viewport is at (or near) the end: new messages then keep it there. */
  atEnd () {
    const s = this.scroller
    return s.scrollHeight - s.scrollTop - s.clientHeight < BOTTOM_SLACK
  }

  /** Show `items`; `follow` keeps the end in view, else the first visible item stays put. */
  setItems (items, follow) {
    const anchor = follow ? null : this.anchor()
    this.items = items
    this.indexOf = new Map()
    for (let i = 0; i < items.length; i++) this.indexOf.set(this.id(items[i]), i)
    this.draw(follow, anchor, true)
  }

  /** Scroll so that the end is in view. */
  toEnd () { this.draw(true, null, false) }

  /** Scroll so that item `index` is at the top of the viewport. */
  scrollToIndex (index) {
    const i = Math.max(0, Math.min(index, this.items.length - 1))
    this.computeOffsets()
    this.draw(false, { id: this.id(this.items[i]), delta: 0 }, false)
  }

  schedule () {
    if (this.scheduled) return
    this.scheduled = true
    requestAnimationFrame(() => {
      this.scheduled = false
      this.draw(this.atEnd(), this.anchor(), false)
    })
  }

  estimate () {
    return this.heights.size ? this.measuredTotal / this.heights.size : FIRST_ESTIMATE
  }

  computeOffsets () {
    const n = this.items.length
    const offsets = new Float64Array(n + 1)
    const guess = this.estimate()
    for (let i = 0; i < n; i++) {
      const known = this.heights.get(this.id(this.items[i]))
      offsets[i + 1] = offsets[i] + (known === undefined ? guess : known)
    }
    this.offsets = offsets
  }

  /** Where the list's content starts, in the scroller's scroll coordinates. */
  listTop () {
    return this.list.getBoundingClientRect().top - this.scroller.getBoundingClientRect().top + this.scroller.scrollTop
  }

  /** The first item visible now and how far below the viewport's top it starts. */
  anchor () {
    if (!this.items.length) return null
    const top = this.scroller.scrollTop - this.listTop()
    const i = Math.min(this.search(top), this.items.length - 1)
    return { id: this.id(this.items[i]), delta: this.offsets[i] - top }
  }

  /** The index of the item that covers `y` (list coordinates), by binary search. */
  search (y) {
    let lo = 0
    let hi = this.items.length
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      if (this.offsets[mid + 1] <= y) lo = mid + 1
      else hi = mid
    }
    return lo
  }

  draw (follow, anchor, changed) {
    const began = performance.now()
    this.drawing = true
    try {
      for (let pass = 0; pass < 3; pass++) {
        this.computeOffsets()
        const n = this.items.length
        const view = this.scroller.clientHeight
        let top
        const at = anchor && this.indexOf.get(anchor.id)
        if (follow || at === undefined || at === null) top = follow ? this.offsets[n] - view : this.scroller.scrollTop - this.listTop()
        else top = this.offsets[at] - anchor.delta
        top = Math.max(0, Math.min(top, this.offsets[n] - view))
        const start = this.search(top - OVERSCAN)
        const end = Math.min(n, this.search(top + view + OVERSCAN) + 1)
        if (changed || pass > 0 || start !== this.range[0] || end !== this.range[1]) {
          this.place(start, end)
          changed = false
        }
        const moved = this.measure()
        const listTop = this.listTop()
        if (follow) this.scroller.scrollTop = this.scroller.scrollHeight
        else if (at !== undefined && at !== null) this.scroller.scrollTop = listTop + this.offsets[at] - anchor.delta
        if (!moved) break
      }
    } finally {
      this.drawing = false
      this.drawMs = performance.now() - began // for benchmarks/browser_open.py
    }
  }

  place (start, end) {
    const nodes = []
    for (let i = start; i < end; i++) nodes.push(this.node(this.items[i], i))
    const tail = end === this.items.length ? this.tail() : []
    this.drawn = nodes
    this.range = [start, end]
    this.list.style.paddingTop = `${this.offsets[start]}px`
    this.list.style.paddingBottom = `${this.offsets[this.items.length] - this.offsets[end]}px`
    this.list.replaceChildren(...nodes, ...tail)
    this.draws++
  }

  /** Record the heights of the drawn items; whether any differed from what was assumed. */
  measure () {
    if (!this.drawn.length) return false
    const gap = parseFloat(getComputedStyle(this.list).rowGap) || 0
    let moved = false
    const [start] = this.range
    for (let k = 0; k < this.drawn.length; k++) {
      const height = this.drawn[k].getBoundingClientRect().height + gap
      const id = this.id(this.items[start + k])
      const before = this.heights.get(id)
      if (before === height) continue
      if (before !== undefined) this.measuredTotal -= before
      this.heights.set(id, height)
      this.measuredTotal += height
      if (before === undefined ? Math.abs(height - (this.offsets[start + k + 1] - this.offsets[start + k])) > 0.5 : true) moved = true
    }
    if (moved) this.computeOffsets()
    return moved
  }
}
