// The chat page: conversations (IndexedDB), streaming answers with a stop button, images, settings, the
// API key, and staying usable when the server goes away and comes back.
import { Api, ConnectionLost, ServerError } from "./api.js";
import { Attachments } from "./attach.js";
import { requestBody, wireSettingsDialog } from "./settings.js";
import {
  ConversationStore, exportJson, loadApiKey, loadSettings, newConversation, parseImport, saveApiKey,
} from "./store.js";
import { answerStats, fillBody, messageElement } from "./view.js";

const $ = (id) => document.getElementById(id);
const CURRENT_KEY = "ocula.current";
const HEALTH_POLL_MS = 1000;

const state = {
  conversation: newConversation(),
  model: null, // {id, vision, contextLength}
  settings: loadSettings(),
  apiKey: loadApiKey(),
  streaming: null, // {controller, conversation, message}
  healthTimer: null,
};
const api = new Api(() => state.apiKey);
const store = new ConversationStore();
const attachments = new Attachments($("attachments"), {
  canTake: () => (state.model?.vision === false
    ? `${state.model.id} does not take images (the server was started without --mmproj): the image was not attached.`
    : null),
  onRefused: (reason) => notice(reason, "error"),
});
const settingsDialog = wireSettingsDialog($("settings"), () => state.settings, (s) => {
  state.settings = s;
});

// ------------------------------------------------------------------ notices and server status

function notice(text, kind = "info") {
  $("notice-text").textContent = text;
  $("notice").className = kind === "error" ? "error" : "";
  $("notice").hidden = false;
}

function clearNotice() {
  $("notice").hidden = true;
}

function setServerStatus(up) {
  const el = $("server-status");
  el.textContent = up ? "" : "server unreachable: retrying…";
  el.classList.toggle("down", !up);
}

function showModel() {
  const m = state.model;
  $("model-name").textContent = m.id;
  const badges = [m.vision === true ? "vision" : m.vision === false ? "text only" : null,
    m.contextLength ? `context ${m.contextLength}` : null].filter(Boolean);
  $("model-badges").replaceChildren(...badges.map((b) => {
    const span = document.createElement("span");
    span.className = "badge";
    span.textContent = b;
    return span;
  }));
  // kept clickable: a click explains why no image can be attached
  $("attach").classList.toggle("unavailable", m.vision === false);
  $("attach").title = m.vision === false ? "This model does not take images" : "Attach images";
}

// Reads what the model can take; asks for the API key when the server wants one.
async function connect() {
  for (;;) {
    try {
      state.model = await api.modelInfo();
      showModel();
      setServerStatus(true);
      return true;
    } catch (e) {
      if (e.status === 401) {
        if (!(await askKey(state.apiKey ? "The server refused the saved API key; enter the right one." : null))) {
          notice("The server needs an API key: requests will be refused until one is given.", "error");
          return false;
        }
        continue;
      }
      if (e.status === 0) {
        setServerStatus(false);
        watchHealth();
      } else {
        notice(`Could not read the model's details: ${e.message}`, "error");
      }
      return false;
    }
  }
}

// Polls /health while the server is away; when it answers again, reconnects.
function watchHealth(onBack) {
  if (state.healthTimer) return;
  setServerStatus(false);
  state.healthTimer = setInterval(async () => {
    if (!(await api.healthy())) return;
    clearInterval(state.healthTimer);
    state.healthTimer = null;
    if (await connect()) {
      notice("The server is back.");
      onBack?.();
    }
  }, HEALTH_POLL_MS);
}

let keyPrompt = null;

function askKey(reason) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason ||
    "This server needs an API key (ocula serve --api-key). It is kept in this browser.";
  $("key-input").value = "";
  keyPrompt = new Promise((resolve) => {
    const done = (ok) => {
      dialog.removeEventListener("close", onClose);
      keyPrompt = null;
      resolve(ok);
    };
    const onClose = () => {
      const key = $("key-input").value.trim();
      if (dialog.returnValue === "key" && key) {
        state.apiKey = key;
        saveApiKey(key);
        done(true);
      } else {
        done(false);
      }
    };
    dialog.addEventListener("close", onClose);
  });
  dialog.returnValue = "";
  dialog.showModal();
  return keyPrompt;
}

// ------------------------------------------------------------------ conversations

async function refreshList() {
  const list = await store.list();
  $("conversations").replaceChildren(...list.map((c) => {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    li.classList.toggle("active", c.id === state.conversation.id);
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = c.title;
    title.title = c.title;
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "rename";
    rename.textContent = "Rename";
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "Delete";
    li.append(title, rename, del);
    return li;
  }));
}

async function openConversation(id) {
  const c = id ? await store.get(id) : null;
  state.conversation = c || newConversation();
  if (c) localStorage.setItem(CURRENT_KEY, c.id);
  $("app").classList.remove("side-shown"); // on a narrow screen the list covers the chat: close it
  render();
  await refreshList();
}

function startRename(li) {
  const id = li.dataset.id;
  const title = li.querySelector(".title");
  const input = document.createElement("input");
  input.value = title.textContent;
  input.setAttribute("aria-label", "Conversation title");
  title.replaceWith(input);
  input.focus();
  input.select();
  let finished = false;
  const finish = async (keep) => {
    if (finished) return;
    finished = true;
    const text = input.value.trim();
    if (keep && text) {
      const c = id === state.conversation.id ? state.conversation : await store.get(id);
      if (c) {
        c.title = text.slice(0, 200);
        await store.put(c);
      }
    }
    await refreshList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    else if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(id) {
  const c = await store.get(id);
  if (!c || !confirm(`Delete the conversation "${c.title}"?`)) return;
  if (state.streaming?.conversation.id === id) state.streaming.controller.abort();
  await store.delete(id);
  if (state.conversation.id === id) await openConversation(null);
  else await refreshList();
}

async function exportAll() {
  const list = await store.list();
  const blob = new Blob([exportJson(list)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `ocula-chats-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function importFile(file) {
  try {
    const conversations = parseImport(await file.text());
    for (const c of conversations) await store.put(c);
    notice(`Imported ${conversations.length} conversation(s) from ${file.name}.`);
    if (conversations.length) await openConversation(conversations[0].id);
  } catch (e) {
    notice(`Could not import ${file.name}: ${e.message}`, "error");
  }
}

// ------------------------------------------------------------------ messages

function render() {
  const c = state.conversation;
  const box = $("messages");
  const empty = $("empty");
  box.replaceChildren(empty, ...c.messages.map((m, i) => messageElement(m, i, i === c.messages.length - 1)));
  empty.hidden = c.messages.length > 0;
  const streaming = state.streaming?.conversation === c;
  box.lastElementChild?.classList.toggle("streaming", streaming);
  box.scrollTop = box.scrollHeight;
}

let renderQueued = false;

// Re-renders the streaming message at most once a frame (tokens may come faster than frames).
function renderStreaming() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    const s = state.streaming;
    if (!s || s.conversation !== state.conversation) return;
    const el = $("messages").lastElementChild;
    const body = el?.querySelector(".body");
    if (!body) return;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    fillBody(body, s.message);
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function titleFrom(text) {
  const line = text.split("\n")[0].trim();
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

async function send() {
  if (state.streaming) return;
  const text = $("prompt").value.trim();
  if (!text && !attachments.items.length) return;
  const c = state.conversation;
  c.messages.push({ role: "user", content: text, images: attachments.take() });
  if (c.title === "New chat") c.title = titleFrom(text) || "Image chat";
  $("prompt").value = "";
  resizePrompt();
  await generate(c);
}

async function retry() {
  const c = state.conversation;
  const last = c.messages[c.messages.length - 1];
  if (state.streaming || last?.role !== "assistant" || !last.status) return;
  c.messages.pop();
  await generate(c);
}

async function generate(c) {
  let body;
  try {
    body = requestBody(c.messages, state.settings);
  } catch (e) {
    notice(e.message, "error");
    await store.put(c);
    render();
    return;
  }
  const message = { role: "assistant", content: "", images: [] };
  c.messages.push(message);
  const controller = new AbortController();
  state.streaming = { controller, conversation: c, message };
  setBusy(true);
  clearNotice();
  render();
  await store.put(c);
  localStorage.setItem(CURRENT_KEY, c.id);
  refreshList();
  const t0 = performance.now();
  let tFirst = null;
  let usage = null;
  let timings = null;
  let finish = null;
  try {
    for await (const event of api.streamChat(body, controller.signal)) {
      if (event.usage) usage = event.usage;
      if (event.timings) timings = event.timings;
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        tFirst ??= performance.now();
        message.content += choice.delta.content;
        renderStreaming();
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
    }
    message.stats = answerStats(usage, timings, t0, tFirst, performance.now(), finish);
  } catch (e) {
    failed(message, e);
  } finally {
    state.streaming = null;
    setBusy(false);
    await store.put(c);
    if (state.conversation === c) render();
  }
}

function failed(message, e) {
  if (e.name === "AbortError") {
    message.status = "stopped";
  } else if (e instanceof ConnectionLost || (e instanceof ServerError && e.status === 0)) {
    message.status = "interrupted";
    message.error = e instanceof ConnectionLost
      ? `The connection to the server was lost mid-answer (did the server stop or restart?). ${message.content ? "The partial answer is kept. " : ""}Retry once the server is back.`
      : `The server cannot be reached (${e.message}). Retry once it is back.`;
    watchHealth();
  } else if (e instanceof ServerError) {
    message.status = "error";
    message.error = `Server error ${e.status}${e.code ? ` (${e.code})` : ""}: ${e.message}`;
    if (e.status === 401) askKey("The server refused the request: enter its API key, then press Retry.");
    if (e.status >= 500) watchHealth();
  } else {
    message.status = "error";
    message.error = `Error: ${e.message || e}`;
  }
}

function stop() {
  state.streaming?.controller.abort();
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // not a secure context (a LAN address over http): the older way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

function resizePrompt() {
  const p = $("prompt");
  p.style.height = "auto";
  p.style.height = `${Math.min(p.scrollHeight + 2, window.innerHeight * 0.4)}px`;
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("prompt").addEventListener("input", resizePrompt);
  $("stop").addEventListener("click", stop);
  $("attach").addEventListener("click", () => {
    const refusal = attachments.canTake();
    if (refusal) notice(refusal, "error");
    else $("file-input").click();
  });
  $("file-input").addEventListener("change", async (e) => {
    await attachments.add(e.target.files);
    e.target.value = "";
  });
  attachments.wire($("main"), $("drop-hint"));
  $("notice-close").addEventListener("click", clearNotice);
  $("new-chat").addEventListener("click", () => openConversation(null));
  $("export").addEventListener("click", exportAll);
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", async (e) => {
    if (e.target.files[0]) await importFile(e.target.files[0]);
    e.target.value = "";
  });
  $("open-settings").addEventListener("click", () => settingsDialog.open());
  settingsDialog.setup();
  $("forget-key").addEventListener("click", () => {
    state.apiKey = "";
    saveApiKey("");
    notice("The API key was removed from this browser.");
  });
  $("toggle-sidebar").addEventListener("click", () => {
    const narrow = window.matchMedia("(max-width: 700px)").matches;
    $("app").classList.toggle(narrow ? "side-shown" : "side-hidden");
  });
  $("conversations").addEventListener("click", (e) => {
    const li = e.target.closest("li");
    if (!li || e.target.tagName === "INPUT") return;
    if (e.target.classList.contains("rename")) startRename(li);
    else if (e.target.classList.contains("delete")) deleteConversation(li.dataset.id);
    else if (li.dataset.id !== state.conversation.id) openConversation(li.dataset.id);
  });
  $("messages").addEventListener("click", async (e) => {
    const target = e.target;
    if (target.classList.contains("copy-code")) {
      const code = target.closest(".code-block").querySelector("code").textContent;
      target.textContent = (await copyText(code)) ? "Copied" : "Copy failed";
      setTimeout(() => { target.textContent = "Copy"; }, 1500);
    } else if (target.classList.contains("copy-msg")) {
      const index = Number(target.closest(".msg").dataset.index);
      target.textContent = (await copyText(state.conversation.messages[index].content)) ? "Copied" : "Copy failed";
      setTimeout(() => { target.textContent = "Copy"; }, 1500);
    } else if (target.classList.contains("retry")) {
      retry();
    }
  });
}

async function start() {
  wire();
  await store.open();
  if (!store.persistent) notice("This browser keeps no storage here: conversations last until the page is closed.");
  await openConversation(localStorage.getItem(CURRENT_KEY));
  await connect();
  document.body.dataset.ready = "true";
}

start();
