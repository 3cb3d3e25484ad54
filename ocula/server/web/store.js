// Conversations live in the browser's IndexedDB (images make them too big for localStorage); settings and
// the API key in localStorage. Where IndexedDB is unavailable (some private modes) conversations are kept
// in memory for the session and `persistent` says so.
//
// A conversation: {id, title, created, updated, messages: [message]}; a message: {role: "user" | "assistant",
// content: string, images: [data URI], stats?, status?: "stopped" | "interrupted" | "error", error?}.

const DB_NAME = "ocula-chat";
const STORE = "conversations";
const SETTINGS_KEY = "ocula.settings";
const API_KEY_KEY = "ocula.apiKey";
export const EXPORT_FORMAT = "ocula-chat";

export const DEFAULT_SETTINGS = {
  systemPrompt: "", temperature: "", topP: "", maxTokens: "", imageMaxTokens: "", jsonMode: false, extra: "",
};

export class ConversationStore {
  constructor() {
    this.db = null;
    this.memory = new Map();
    this.persistent = false;
  }

  async open() {
    try {
      this.db = await new Promise((resolve, reject) => {
        const req = indexedDB.open(DB_NAME, 1);
        req.onupgradeneeded = () => req.result.createObjectStore(STORE, { keyPath: "id" });
        req.onsuccess = () => resolve(req.result);
        req.onerror = () => reject(req.error);
      });
      this.persistent = true;
    } catch {
      this.db = null;
    }
    return this;
  }

  _tx(mode, work) {
    return new Promise((resolve, reject) => {
      const tx = this.db.transaction(STORE, mode);
      const req = work(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(req?.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error || new Error("the browser's storage refused the write (full?)"));
    });
  }

  async list() {
    const all = this.db ? await this._tx("readonly", (s) => s.getAll()) : [...this.memory.values()];
    return all.sort((a, b) => b.updated - a.updated);
  }

  async get(id) {
    return this.db ? this._tx("readonly", (s) => s.get(id)) : this.memory.get(id);
  }

  async put(conversation) {
    conversation.updated = Date.now();
    if (this.db) await this._tx("readwrite", (s) => s.put(conversation));
    else this.memory.set(conversation.id, structuredClone(conversation));
  }

  async delete(id) {
    if (this.db) await this._tx("readwrite", (s) => s.delete(id));
    else this.memory.delete(id);
  }
}

export function newConversation() {
  const now = Date.now();
  return { id: newId(), title: "New chat", created: now, updated: now, messages: [] };
}

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export function exportJson(conversations) {
  return JSON.stringify({ format: EXPORT_FORMAT, version: 1, exported: new Date().toISOString(), conversations }, null, 1);
}

// Conversations from an export file, checked field by field (the file may come from anywhere); imported
// conversations get fresh ids so they never overwrite existing ones. Throws an Error naming the problem.
export function parseImport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new Error(`the file is not JSON (${e.message})`);
  }
  const list = Array.isArray(data) ? data : data?.conversations;
  if (!Array.isArray(list)) throw new Error('the file has no "conversations" list (expected an ocula chat export)');
  return list.map((c, i) => {
    const where = `conversation ${i + 1}`;
    if (!c || typeof c !== "object" || !Array.isArray(c.messages)) throw new Error(`${where} has no "messages" list`);
    const messages = c.messages.map((m, j) => {
      if (!m || (m.role !== "user" && m.role !== "assistant")) {
        throw new Error(`${where}, message ${j + 1}: role must be "user" or "assistant"`);
      }
      if (typeof m.content !== "string") throw new Error(`${where}, message ${j + 1}: content must be a string`);
      const images = Array.isArray(m.images) ? m.images.filter((u) => typeof u === "string" && u.startsWith("data:image/")) : [];
      const out = { role: m.role, content: m.content, images };
      if (m.stats && typeof m.stats === "object") out.stats = m.stats;
      if (["stopped", "interrupted", "error"].includes(m.status)) out.status = m.status;
      if (typeof m.error === "string") out.error = m.error;
      return out;
    });
    const now = Date.now();
    return {
      id: newId(), title: typeof c.title === "string" && c.title.trim() ? c.title.slice(0, 200) : "Imported chat",
      created: Number.isFinite(c.created) ? c.created : now, updated: now, messages,
    };
  });
}

export function loadSettings() {
  try {
    return { ...DEFAULT_SETTINGS, ...JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") };
  } catch {
    return { ...DEFAULT_SETTINGS };
  }
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
}

export function loadApiKey() {
  return localStorage.getItem(API_KEY_KEY) || "";
}

export function saveApiKey(key) {
  if (key) localStorage.setItem(API_KEY_KEY, key);
  else localStorage.removeItem(API_KEY_KEY);
}
