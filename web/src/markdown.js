// Markdown for untrusted text (design §6, Web client): messages come from other peers and from
// models, so nothing in them may run or load. marked parses; its raw HTML is shown as text, a
// link keeps only http(s)/mailto targets, an image becomes a link that loads nothing until it is
// clicked; DOMPurify then removes anything that still looks active, as a second line.
import { Marked } from 'marked'
import DOMPurify from 'dompurify'

const SAFE_URL = /^(?:https?:|mailto:)/i

const escape = (text) => text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]))

function safeHref (href) {
  try {
    const url = new URL(href, 'https://invalid.example/')
    return SAFE_URL.test(href.trim()) ? url.href : null
  } catch {
    return null
  }
}

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html ({ text }) { return escape(text) },
    link ({ href, title, tokens }) {
      const inner = this.parser.parseInline(tokens)
      const safe = safeHref(href)
      if (safe === null) return `${inner} (${escape(href)})`
      const t = title ? ` title="${escape(title)}"` : ''
      return `<a href="${escape(safe)}"${t} rel="noopener noreferrer nofollow" target="_blank">${inner}</a>`
    },
    image ({ href, text }) {
      const safe = safeHref(href)
      const label = `image: ${escape(text || href)}`
      if (safe === null) return `[${label}]`
      return `<a href="${escape(safe)}" class="image-link" rel="noopener noreferrer nofollow" target="_blank">[${label}]</a>`
    }
  }
})

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('rel', 'noopener noreferrer nofollow')
    node.setAttribute('target', '_blank')
  }
})

const PURIFY = {
  ALLOWED_TAGS: ['p', 'br', 'strong', 'em', 'del', 'code', 'pre', 'a', 'ul', 'ol', 'li', 'blockquote', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'hr', 'table', 'thead', 'tbody', 'tr', 'th', 'td', 'span', 'input'],
  ALLOWED_ATTR: ['href', 'title', 'class', 'rel', 'target', 'type', 'checked', 'disabled', 'align'],
  ALLOWED_URI_REGEXP: SAFE_URL
}

/** Sanitised nodes for `text` (markdown); everything from peers goes through here. DOMPurify
 * hands back a fragment, so the page never assigns markup (no innerHTML). */
export function renderMarkdown (text) {
  const html = marked.parse(text, { async: false })
  return DOMPurify.sanitize(html, { ...PURIFY, RETURN_DOM_FRAGMENT: true })
}
