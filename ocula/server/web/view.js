// DOM for one message, and the per-answer statistics line. Model text reaches the page only through
// renderMarkdown (escaped) or textContent.
import { renderMarkdown } from "./markdown.js";

export function messageElement(message, index, isLast) {
  const el = document.createElement("div");
  el.className = `msg ${message.role}`;
  el.dataset.index = String(index);
  if (message.images?.length) {
    const images = document.createElement("div");
    images.className = "images";
    for (const url of message.images) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = "attached image";
      images.append(img);
    }
    el.append(images);
  }
  const body = document.createElement("div");
  body.className = "body";
  el.append(body);
  fillBody(body, message);
  if (message.error) {
    const err = document.createElement("div");
    err.className = "error-text";
    err.textContent = message.error;
    el.append(err);
  }
  if (message.role === "assistant") el.append(metaLine(message, isLast));
  return el;
}

export function fillBody(body, message) {
  if (message.role === "assistant") body.innerHTML = renderMarkdown(message.content);
  else body.textContent = message.content;
  body.hidden = !message.content && message.role === "assistant" && Boolean(message.status);
}

function metaLine(message, isLast) {
  const meta = document.createElement("div");
  meta.className = "meta";
  if (message.stats) {
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = statsText(message.stats);
    meta.append(stats);
  }
  if (message.status) {
    const status = document.createElement("span");
    status.className = "status";
    status.textContent = { stopped: "stopped", interrupted: "interrupted", error: "failed" }[message.status];
    meta.append(status);
  }
  if (message.content) meta.append(button("Copy", "copy-msg"));
  if (isLast && message.status) meta.append(button("Retry", "retry"));
  return meta;
}

function button(label, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  return b;
}

// stats: {completionTokens, promptTokens, cachedTokens, tokensPerSecond, ttftMs, imageTokens, finish}
export function statsText(s) {
  const parts = [];
  if (s.completionTokens != null) parts.push(`${s.completionTokens} tokens`);
  if (s.tokensPerSecond != null) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
  if (s.promptTokens != null) parts.push(`prompt ${s.cachedTokens ?? 0} cached / ${s.promptTokens}`);
  if (s.ttftMs != null) parts.push(`TTFT ${Math.round(s.ttftMs)} ms`);
  if (s.imageTokens) parts.push(`${s.imageTokens} image tokens`);
  if (s.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

// Statistics of a finished answer: the server's usage and timings when it sent them (ocula sends timings
// with the usage chunk), otherwise what the page measured itself.
export function answerStats(usage, timings, t0, tFirst, tEnd, finish) {
  const s = { finish };
  if (usage) {
    s.completionTokens = usage.completion_tokens;
    s.promptTokens = usage.prompt_tokens;
    s.cachedTokens = usage.prompt_tokens_details?.cached_tokens ?? 0;
  }
  if (timings?.generation_tps != null) s.tokensPerSecond = timings.generation_tps;
  else if (usage && tFirst != null && tEnd > tFirst && usage.completion_tokens > 1) {
    s.tokensPerSecond = (usage.completion_tokens - 1) / ((tEnd - tFirst) / 1000);
  }
  s.ttftMs = timings?.ttft_ms ?? (tFirst != null ? tFirst - t0 : null);
  if (timings?.image_tokens) s.imageTokens = timings.image_tokens;
  return s;
}
