// The studio's HTTP client: the key as a Bearer header, 429/503 retried after Retry-After (the
// wait shown to the user), errors turned into {field, message} from the server's error model.

const KEY = "acestep.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(value) {
  localStorage.setItem(KEY, value);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export class ApiError extends Error {
  constructor(status, detail) {
    const first = Array.isArray(detail) && detail.length ? detail[0] : { loc: [], msg: String(detail) };
    super(first.msg || `HTTP ${status}`);
    this.status = status;
    this.field = (first.loc || []).filter((part) => part !== "body").at(-1) || null;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// fetch with retries on 429/503; onWait(seconds) tells the user how long.
export async function request(path, options = {}, onWait = () => {}) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if ((response.status === 429 || response.status === 503) && attempt < 5) {
      const seconds = Math.max(1, parseInt(response.headers.get("Retry-After") || "2", 10));
      onWait(seconds);
      await sleep(seconds * 1000);
      continue;
    }
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try { detail = (await response.json()).detail ?? detail; } catch { /* not JSON */ }
      if (response.status === 401) detail = [{ loc: ["api-key"], msg: "This server needs an API key (field at the top)." }];
      throw new ApiError(response.status, detail);
    }
    return response;
  }
}

export async function json(path, body, onWait) {
  const response = await request(path, {
    method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
  }, onWait);
  return response.json();
}

// A generation with files: multipart, the request as JSON in its "request" part.
export async function upload(path, body, files, onWait) {
  const data = new FormData();
  data.append("request", JSON.stringify(body));
  for (const [name, file] of Object.entries(files)) data.append(name, file, file.name);
  const response = await request(path, { method: "POST", body: data }, onWait);
  return response.json();
}

// Server-sent events over fetch (EventSource cannot send the Authorization header).
export async function* events(path) {
  const response = await request(path, { headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6));
      if (data.length) yield JSON.parse(data.join("\n"));
    }
  }
}

// An audio file as a Blob (an <audio src> URL cannot carry the key; the page makes object URLs).
export async function audioBlob(path) {
  return (await request(path)).blob();
}
