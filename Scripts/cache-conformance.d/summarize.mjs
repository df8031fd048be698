// node summarize.mjs SUITE_DIR results.json [--list]
// Classifies results the way cache-tests.fyi does (lib/results.mjs, dependencies honoured).
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
const [suiteDir, resultsFile, flag] = process.argv.slice(2)
const imp = p => import(pathToFileURL(path.resolve(suiteDir, p)).href)
const tests = (await imp('tests/index.mjs')).default
const { determineTestResult, resultTypes } = await imp('test-engine/lib/results.mjs')
const results = JSON.parse(fs.readFileSync(resultsFile, 'utf8'))
const names = new Map(Object.entries(resultTypes).map(([k, v]) => [v, k]))
const counts = {}
const rows = []
for (const suite of tests) {
  for (const t of suite.tests) {
    if (t.browser_only) continue
    const r = determineTestResult(tests, t.id, results)
    const cat = names.get(r) || 'unknown'
    counts[cat] = (counts[cat] || 0) + 1
    const res = results[t.id]
    rows.push({ cat, suite: suite.id, id: t.id, kind: t.kind || 'required', name: t.name,
      msg: res === true || res === undefined ? '' : (Array.isArray(res) ? res.join(': ') : String(res)),
      deps: (t.depends_on || []).join(',') })
  }
}
const order = ['pass', 'fail', 'optional_fail', 'yes', 'no', 'setup_fail', 'harness_fail', 'dependency_fail', 'retry', 'untested']
console.log(`cache-tests: ${rows.length} tests (${Object.keys(results).length} results in ${resultsFile})`)
console.log(order.filter(k => counts[k]).map(k => `${k}=${counts[k]}`).join('  '))
fs.writeFileSync(path.join(path.dirname(resultsFile), 'summary.tsv'),
  'category\tsuite\tid\tkind\tmessage\tdepends_on\tname\n' +
  rows.map(r => [r.cat, r.suite, r.id, r.kind, r.msg, r.deps, r.name].join('\t')).join('\n') + '\n')
if (flag === '--list') {
  for (const cat of order.filter(k => k !== 'pass' && k !== 'yes' && counts[k])) {
    console.log(`\n== ${cat}`)
    for (const r of rows.filter(r => r.cat === cat)) console.log(`  ${r.id} [${r.kind}] ${r.msg}`)
  }
}
