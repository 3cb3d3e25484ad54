// Talking to the server this page came from: the API key as a Bearer token, readable errors from the
// OpenAI-shaped error bodies, Server-Sent Events from /v1/chat/completions, what the model can take.

export class ServerError extends Error {
  // status: the HTTP status (0 when the server could not be reached); code: the error body's code
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The stream ended before the answer did (server stopped, network gone): the partial answer is kept.
export class ConnectionLost extends Error {}

export class Api {
  constructor(getKey) {
    this.getKey = getKey;
  }

  headers(json = false) {
    const h = {};
    const key = this.getKey();
    if (key) h.Authorization = `Bearer ${key}`;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  async get(path) {
    let response;
    try {
      response = await fetch(path, { headers: this.headers(), cache: "no-store" });
    } catch (e) {
      throw new ServerError(0, `the server cannot be reached (${e.message})`);
    }
    if (!response.ok) throw await errorFrom(response);
    return response.json();
  }

  async healthy() {
    try {
      const r = await fetch("/health", { cache: "no-store" });
      return r.ok;
    } catch {
      return false;
    }
  }

  // {id, vision, contextLength}: from /props when the server has it (llama-server's shape, modalities
  // {vision, audio}), else from /v1/models' model card.
  async modelInfo() {
    let props = null;
    try {
      props = await this.get("/props");
    } catch (e) {
      if (e.status === 401) throw e;
    }
    const models = await this.get("/v1/models");
    const card = models?.data?.[0] || {};
    let vision = null;
    if (props?.modalities && typeof props.modalities.vision === "boolean") vision = props.modalities.vision;
    else if (card.modalities && typeof card.modalities.vision === "boolean") vision = card.modalities.vision;
    else if (card.capabilities && typeof card.capabilities.vision === "boolean") vision = card.capabilities.vision;
    return { id: card.id || "model", vision, contextLength: card.context_length ?? props?.n_ctx ?? null };
  }

  // Streams a chat completion; yields each parsed `data:` event. Throws ServerError for an error response
  // or an error event, ConnectionLost when the stream breaks off, and lets an AbortError through.
  async *streamChat(body, signal) {
    let response;
    try {
      response = await fetch("/v1/chat/completions", {
        method: "POST", headers: this.headers(true), body: JSON.stringify(body), signal,
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ServerError(0, `the server cannot be reached (${e.message})`);
    }
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    try {
      while (!done) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (e) {
          if (e.name === "AbortError") throw e;
          throw new ConnectionLost(`the connection to the server broke off mid-answer (${e.message})`);
        }
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (!data) continue;
          if (data === "[DONE]") {
            done = true;
            break;
          }
          let parsed;
          try {
            parsed = JSON.parse(data);
          } catch {
            throw new ServerError(502, `the server sent an event that is not JSON: ${data.slice(0, 200)}`);
          }
          if (parsed.error) throw errorFromBody(500, parsed);
          yield parsed;
        }
      }
    } finally {
      reader.releaseLock?.();
    }
    if (!done) throw new ConnectionLost("the server closed the stream before the answer was complete");
  }
}

async function errorFrom(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a proxy's page, a plain-text error
  }
  if (body?.error) return errorFromBody(response.status, body);
  const detail = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300);
  return new ServerError(response.status, `${response.status} ${response.statusText}${detail ? `: ${detail}` : ""}`);
}

function errorFromBody(status, body) {
  const e = body.error;
  const message = typeof e === "string" ? e : e.message || JSON.stringify(e);
  const code = typeof e === "object" ? e.code || e.type || null : null;
  return new ServerError(status, message, code);
}
