// A small Markdown renderer for model output, which is untrusted: every piece of source text is HTML-escaped
// before any formatting is applied, and the only markup in the result is the fixed set of tags written
// below. Links keep only http(s) and mailto targets. Handles what chat models write: paragraphs, headings,
// fenced code (with a copy button), inline code, bold/italic/strikethrough, links, lists (nested by
// indentation), block quotes, rules and pipe tables. An unclosed code fence (mid-stream) runs to the end.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Placeholders for finished inline pieces (code spans, links) while the rest is formatted; the private-use
// characters they are made of are removed from the source first, so the source cannot forge one.
const HOLD_OPEN = "\uE000";
const HOLD_CLOSE = "\uE001";
const HOLD_RE = /\uE000(\d+)\uE001/g;

const FENCE_RE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING_RE = /^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$/;
const RULE_RE = /^ {0,3}([-*_])([ \t]*\1){2,}[ \t]*$/;
const QUOTE_RE = /^ {0,3}> ?(.*)$/;
const ITEM_RE = /^( *)([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const TABLE_SEP_RE = /^ *\|? *:?-{1,}:? *(\| *:?-{1,}:? *)*\|? *$/;

export function renderMarkdown(source) {
  const text = String(source ?? "").replace(/[\uE000\uE001]/g, "").replace(/\r\n?/g, "\n");
  return renderBlocks(text.split("\n"));
}

function renderBlocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    const fence = line.match(FENCE_RE);
    if (fence) {
      const marker = fence[1];
      const body = [];
      i++;
      while (i < lines.length && !isClosingFence(lines[i], marker)) body.push(lines[i++]);
      i++; // the closing fence (or past the end)
      out.push(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    const heading = line.match(HEADING_RE);
    if (heading) {
      const level = heading[1].length;
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      i++;
      continue;
    }
    if (RULE_RE.test(line)) {
      out.push("<hr>");
      i++;
      continue;
    }
    if (QUOTE_RE.test(line)) {
      const body = [];
      while (i < lines.length && lines[i].trim() && QUOTE_RE.test(lines[i])) body.push(lines[i++].match(QUOTE_RE)[1]);
      out.push(`<blockquote>${renderBlocks(body)}</blockquote>`);
      continue;
    }
    if (ITEM_RE.test(line)) {
      i = list(lines, i, out);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEP_RE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      i = table(lines, i, out);
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) para.push(lines[i++].trim());
    out.push(`<p>${para.map(inline).join("<br>")}</p>`);
  }
  return out.join("");
}

function startsBlock(lines, i) {
  const line = lines[i];
  return FENCE_RE.test(line) || HEADING_RE.test(line) || RULE_RE.test(line) || QUOTE_RE.test(line) ||
    ITEM_RE.test(line);
}

function isClosingFence(line, marker) {
  const t = line.trim();
  return t.length >= marker.length && t[0] === marker[0] && /^(`+|~+)$/.test(t);
}

function codeBlock(code, lang) {
  const name = (lang || "").replace(/[^\w+#.-]/g, "").slice(0, 32);
  const cls = name ? ` class="language-${escapeHtml(name)}"` : "";
  return `<div class="code-block"><div class="code-head"><span class="code-lang">${escapeHtml(name || "code")}` +
    `</span><button type="button" class="copy-code">Copy</button></div><pre><code${cls}>${escapeHtml(code)}` +
    `</code></pre></div>`;
}

// A list starting at lines[start]: its items are lines at the same indentation with the same kind of marker;
// lines indented deeper (or continuing the item's text) belong to the item and are rendered recursively.
function list(lines, start, out) {
  const first = lines[start].match(ITEM_RE);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const items = [];
  let i = start;
  while (i < lines.length) {
    const m = lines[i].match(ITEM_RE);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    i++;
    while (i < lines.length) {
      const next = lines[i];
      if (!next.trim()) {
        // a blank line ends the item unless the next line is indented into it
        if (i + 1 < lines.length && leadingSpaces(lines[i + 1]) > indent && lines[i + 1].trim()) {
          body.push("");
          i++;
          continue;
        }
        break;
      }
      const sub = next.match(ITEM_RE);
      if (sub && sub[1].length <= indent) break;
      if (!sub && leadingSpaces(next) <= indent && startsBlock(lines, i)) break;
      body.push(next.slice(Math.min(leadingSpaces(next), indent + 2)));
      i++;
    }
    items.push(body);
  }
  const startAttr = ordered && parseInt(first[2], 10) !== 1 ? ` start="${parseInt(first[2], 10)}"` : "";
  const tag = ordered ? "ol" : "ul";
  const html = items.map((body) => {
    const inner = renderBlocks(body);
    // a one-paragraph item shows without the paragraph's margins
    const tight = inner.startsWith("<p>") && inner.indexOf("<p>", 1) === -1 ? inner.replace(/^<p>([\s\S]*?)<\/p>/, "$1") : inner;
    return `<li>${tight}</li>`;
  }).join("");
  out.push(`<${tag}${startAttr}>${html}</${tag}>`);
  return i;
}

function leadingSpaces(line) {
  return line.length - line.replace(/^ +/, "").length;
}

function table(lines, start, out) {
  const header = cells(lines[start]);
  const aligns = cells(lines[start + 1]).map((c) => {
    const left = c.startsWith(":"), right = c.endsWith(":");
    return left && right ? "center" : right ? "right" : left ? "left" : "";
  });
  let i = start + 2;
  const rows = [];
  while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(cells(lines[i++]));
  const cell = (tag, text, k) => {
    const align = aligns[k] ? ` class="align-${aligns[k]}"` : "";
    return `<${tag}${align}>${inline(text)}</${tag}>`;
  };
  const head = `<tr>${header.map((c, k) => cell("th", c, k)).join("")}</tr>`;
  const body = rows.map((r) => `<tr>${header.map((_, k) => cell("td", r[k] ?? "", k)).join("")}</tr>`).join("");
  out.push(`<div class="table-wrap"><table><thead>${head}</thead><tbody>${body}</tbody></table></div>`);
  return i;
}

function cells(line) {
  let t = line.trim();
  if (t.startsWith("|")) t = t.slice(1);
  if (t.endsWith("|") && !t.endsWith("\\|")) t = t.slice(0, -1);
  return t.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

// Inline formatting of one line of source text.
function inline(source) {
  const held = [];
  const hold = (html) => `${HOLD_OPEN}${held.push(html) - 1}${HOLD_CLOSE}`;
  // code spans first: nothing inside them is formatted
  let text = source.replace(/(`+)([\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => hold(`<code>${escapeHtml(code.trim() || code)}</code>`));
  // links: [label](target) and bare URLs; only http(s) and mailto targets become links
  text = text.replace(/\[([^\]\n]+)\]\(\s*<?([^\s)<>]+)>?(?:\s+"[^"]*")?\s*\)|\b(https?:\/\/[^\s<>"')\]]+[^\s<>"')\].,;:!?])/g,
    (whole, label, target, bare) => {
      const url = bare || target;
      if (!/^(https?:\/\/|mailto:)/i.test(url)) return whole;
      const shown = bare ? escapeHtml(bare) : emphasis(escapeHtml(label));
      return hold(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer nofollow">${shown}</a>`);
    });
  text = emphasis(escapeHtml(text));
  return text.replace(HOLD_RE, (_, k) => held[Number(k)]);
}

// Bold, italic and strikethrough on already-escaped text (their markers are not escaped characters).
function emphasis(html) {
  return html
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
}
