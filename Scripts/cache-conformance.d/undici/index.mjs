// Minimal local stand-in for the `undici` package (the npm registry is unreachable here).
// The cache-tests client imports undici only for the interim-response tests: it does
//   new undici.Agent().compose(interceptor)  and passes that as fetch()'s `dispatcher`.
// Node 20's built-in fetch (bundled undici 6) drives a dispatcher with the legacy handler API
// (onConnect/onHeaders/onData/onComplete/onError); the suite's interceptor speaks the undici 7
// API (onRequestStart/onResponseStart/onResponseData/onResponseEnd/onResponseError). This stub
// performs the request with node:http (whose 'information' event exposes 1xx responses) and
// adapts between the two APIs. HTTP only, no pooling; enough for the four interim-* tests.
import http from 'node:http'

// legacy handler (what fetch passes) -> new-style handler (what interceptors expect)
class WrapLegacy {
  constructor (h) { this.h = h }
  onRequestStart (controller) { this.h.onConnect?.((err) => controller.abort(err)) }
  onResponseStart (controller, status, headers, statusText) {
    if (status < 200) return // legacy handlers never see 1xx (except 101)
    const raw = []
    for (const [k, v] of Object.entries(headers)) {
      for (const one of Array.isArray(v) ? v : [v]) raw.push(Buffer.from(k), Buffer.from(String(one), 'latin1'))
    }
    this.h.onHeaders?.(status, raw, () => controller.resume(), statusText)
  }
  onResponseData (controller, chunk) { this.h.onData?.(chunk) }
  onResponseEnd (controller, trailers) { this.h.onComplete?.([]) }
  onResponseError (controller, err) { this.h.onError?.(err) }
}

function baseDispatch (opts, handler) {
  const url = new URL(opts.path, opts.origin)
  let headers = opts.headers || {}
  if (Array.isArray(headers)) { // flat [k, v, k, v] or [[k, v]]
    const o = {}
    if (Array.isArray(headers[0])) for (const [k, v] of headers) o[k] = v
    else for (let i = 0; i < headers.length; i += 2) o[headers[i]] = headers[i + 1]
    headers = o
  }
  let req
  let aborted = false
  const controller = {
    abort (err) { aborted = true; if (req) req.destroy(err || new Error('aborted')) },
    pause () {}, resume () {}, get aborted () { return aborted }, get paused () { return false }
  }
  handler.onRequestStart?.(controller, {})
  req = http.request({
    host: url.hostname, port: url.port || 80, method: opts.method || 'GET',
    path: url.pathname + url.search, headers, agent: false
  })
  req.on('information', (info) => {
    handler.onResponseStart?.(controller, info.statusCode, info.headers, info.statusMessage)
  })
  req.on('response', (res) => {
    const hdrs = {}
    for (let i = 0; i < res.rawHeaders.length; i += 2) {
      const k = res.rawHeaders[i].toLowerCase(); const v = res.rawHeaders[i + 1]
      if (k in hdrs) hdrs[k] = [].concat(hdrs[k], v); else hdrs[k] = v
    }
    handler.onResponseStart?.(controller, res.statusCode, hdrs, res.statusMessage)
    res.on('data', (c) => handler.onResponseData?.(controller, c))
    res.on('end', () => handler.onResponseEnd?.(controller, {}))
    res.on('error', (e) => handler.onResponseError?.(controller, e))
  })
  req.on('error', (e) => handler.onResponseError?.(controller, e))
  const body = opts.body
  if (body == null) req.end()
  else if (typeof body === 'string' || body instanceof Uint8Array) req.end(body)
  else (async () => { for await (const c of body) req.write(c); req.end() })().catch(e => req.destroy(e))
  return true
}

export class Agent {
  constructor () { this._dispatch = baseDispatch }
  compose (...interceptors) {
    let d = baseDispatch
    for (const i of interceptors.flat()) d = i(d)
    const composed = new Agent()
    composed._dispatch = d
    return composed
  }
  dispatch (opts, handler) {
    const h = (typeof handler.onResponseStart === 'function') ? handler : new WrapLegacy(handler)
    return this._dispatch(opts, h)
  }
  close () { return Promise.resolve() }
  destroy () { return Promise.resolve() }
  on () { return this } ; once () { return this } ; off () { return this } ; emit () { return false }
}
export default { Agent }
