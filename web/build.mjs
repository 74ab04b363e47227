// Builds the web client into crdtchat/web/static, which ships inside the Python package (a pip
// user needs no node). The hash of every input (this file, package.json, package-lock.json,
// src/, public/) is recorded in the bundle and in build.json; tests/web/test_web_build.py computes
// it again (crdtchat.web.source_hash) and fails if the shipped files were built from other
// sources. Run: cd web && npm ci && npm run build
import { build } from 'esbuild'
import { createHash } from 'node:crypto'
import { readFileSync, readdirSync, writeFileSync, mkdirSync, copyFileSync, rmSync, statSync } from 'node:fs'
import { join, relative, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = fileURLToPath(new URL('.', import.meta.url))
const out = join(here, '..', 'crdtchat', 'web', 'static')

function files (dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name)
    return statSync(path).isDirectory() ? files(path) : [path]
  })
}

/** sha256 over "path NUL sha256(content) LF" of each input, sorted by path (as crdtchat.web). */
export function sourceHash () {
  const inputs = [
    ...['build.mjs', 'package.json', 'package-lock.json'].map((name) => join(here, name)),
    ...files(join(here, 'src')),
    ...files(join(here, 'public'))
  ].map((path) => relative(here, path).split(sep).join('/'))
  const lines = [...new Set(inputs)].sort().map((p) =>
    `${p}\0${createHash('sha256').update(readFileSync(join(here, p))).digest('hex')}\n`)
  return createHash('sha256').update(lines.join('')).digest('hex')
}

const hash = sourceHash()
rmSync(out, { recursive: true, force: true })
mkdirSync(out, { recursive: true })
const common = {
  bundle: true,
  minify: true,
  format: 'esm',
  target: ['es2022'],
  legalComments: 'none',
  banner: { js: `/* crdtchat-web source-hash: ${hash} */` },
  logLevel: 'warning'
}
await build({ ...common, entryPoints: [join(here, 'src', 'app.js')], outfile: join(out, 'app.js') })
await build({
  ...common,
  format: 'iife',
  entryPoints: [join(here, 'src', 'sw.js')],
  outfile: join(out, 'sw.js'),
  define: { SHELL_VERSION: JSON.stringify(hash.slice(0, 16)) }
})
for (const path of files(join(here, 'public'))) copyFileSync(path, join(out, relative(join(here, 'public'), path)))
writeFileSync(join(out, 'build.json'), JSON.stringify({ source_hash: hash }, null, 2) + '\n')
console.log(`built ${out} from sources ${hash}`)
