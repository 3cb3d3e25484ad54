// The settings dialog and the request body it shapes.
import { DEFAULT_SETTINGS, saveSettings } from "./store.js";

const NUMBERS = {
  temperature: { field: "temperature", parse: parseFloat, min: 0, label: "Temperature" },
  topP: { field: "top_p", parse: parseFloat, min: 0, max: 1, label: "Top-p" },
  maxTokens: { field: "max_tokens", parse: (v) => Number(v), integer: true, min: 1, label: "Max tokens" },
  imageMaxTokens: { field: "image_max_tokens", parse: (v) => Number(v), integer: true, min: 1, label: "Image token budget" },
};

// The messages of a conversation as /v1/chat/completions wants them (images as data URIs), and the
// settings as request fields; an empty setting leaves the server's default.
export function requestBody(messages, settings) {
  const out = [];
  if (settings.systemPrompt?.trim()) out.push({ role: "system", content: settings.systemPrompt });
  for (const m of messages) {
    if (m.role === "assistant") {
      if (m.content) out.push({ role: "assistant", content: m.content });
      continue;
    }
    if (m.images?.length) {
      const parts = m.images.map((url) => ({ type: "image_url", image_url: { url } }));
      if (m.content) parts.push({ type: "text", text: m.content });
      out.push({ role: "user", content: parts });
    } else {
      out.push({ role: "user", content: m.content });
    }
  }
  const body = { messages: out, stream: true, stream_options: { include_usage: true } };
  for (const [name, spec] of Object.entries(NUMBERS)) {
    const value = String(settings[name] ?? "").trim();
    if (value) body[spec.field] = spec.parse(value);
  }
  if (settings.jsonMode) body.response_format = { type: "json_object" };
  Object.assign(body, parseExtra(settings.extra));
  return body;
}

function parseExtra(text) {
  if (!text || !text.trim()) return {};
  let extra;
  try {
    extra = JSON.parse(text);
  } catch (e) {
    throw new Error(`Settings: the extra request fields are not JSON (${e.message})`);
  }
  if (!extra || typeof extra !== "object" || Array.isArray(extra)) {
    throw new Error("Settings: the extra request fields must be a JSON object, e.g. {\"seed\": 1}");
  }
  return extra;
}

// The problem with a settings form's values, or null.
function check(values) {
  for (const [name, spec] of Object.entries(NUMBERS)) {
    const raw = String(values[name] ?? "").trim();
    if (!raw) continue;
    const v = spec.parse(raw);
    if (!Number.isFinite(v) || (spec.integer && !Number.isInteger(v))) return `${spec.label} must be ${spec.integer ? "a whole number" : "a number"}`;
    if (v < spec.min || (spec.max != null && v > spec.max)) {
      return `${spec.label} must be ${spec.max != null ? `between ${spec.min} and ${spec.max}` : `at least ${spec.min}`}`;
    }
  }
  try {
    parseExtra(values.extra);
  } catch (e) {
    return e.message.replace(/^Settings: /, "");
  }
  return null;
}

export function wireSettingsDialog(dialog, getSettings, onSaved) {
  const form = dialog.querySelector("form");
  const error = dialog.querySelector("#settings-error");
  return {
    open() {
      const s = getSettings();
      for (const name of Object.keys(DEFAULT_SETTINGS)) {
        const input = form.elements[name];
        if (input.type === "checkbox") input.checked = Boolean(s[name]);
        else input.value = s[name] ?? "";
      }
      error.hidden = true;
      dialog.showModal();
    },
    setup() {
      dialog.querySelector("#settings-cancel").addEventListener("click", () => dialog.close());
      form.addEventListener("submit", (e) => {
        e.preventDefault();
        const values = {};
        for (const name of Object.keys(DEFAULT_SETTINGS)) {
          const input = form.elements[name];
          values[name] = input.type === "checkbox" ? input.checked : input.value;
        }
        const problem = check(values);
        if (problem) {
          error.textContent = problem;
          error.hidden = false;
          return;
        }
        saveSettings(values);
        onSaved(values);
        dialog.close();
      });
    },
  };
}
