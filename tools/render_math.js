// Render TeX to HTML with KaTeX, server side, for tools/build_docs.py (no JavaScript on the pages, no CDN).
// stdin: a JSON list of [tex, display] pairs. stdout: a JSON list, for each pair {"html": ...} or {"error": ...}.
const katex = require('katex');

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', chunk => { input += chunk; });
process.stdin.on('end', () => {
  const out = JSON.parse(input).map(([tex, display]) => {
    try { return {html: katex.renderToString(tex, {displayMode: display, throwOnError: true, output: 'html'})}; }
    catch (e) { return {error: String(e.message || e)}; }
  });
  process.stdout.write(JSON.stringify(out));
});
