// The service worker: keeps the app shell so the page opens with the network gone (the
// conversation itself comes from IndexedDB). Pages are fetched from the network first, the
// shell from the cache; nothing else (websockets, blobs, /auth) goes through the cache.
const CACHE = `crdtchat-shell-${SHELL_VERSION}` // eslint-disable-line no-undef
const SHELL = ['/', '/static/app.js', '/static/app.css', '/static/manifest.webmanifest', '/static/icon.svg']

self.addEventListener('install', (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()))
})

self.addEventListener('activate', (event) => {
  event.waitUntil(caches.keys()
    .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
    .then(() => self.clients.claim()))
})

self.addEventListener('fetch', (event) => {
  const url = new URL(event.request.url)
  if (event.request.method !== 'GET' || url.origin !== location.origin) return
  const page = event.request.mode === 'navigate' && (url.pathname === '/' || url.pathname.startsWith('/c/'))
  if (page) {
    event.respondWith(fetch(event.request).catch(() => caches.match('/')))
  } else if (SHELL.includes(url.pathname)) {
    event.respondWith(fetch(event.request).catch(() => caches.match(url.pathname)))
  }
})
