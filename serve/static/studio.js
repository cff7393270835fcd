// The studio page: a form built on the server's own schema (defaults and ranges come from
// /openapi.json), one card per generation fed by its server-sent events (its first song playing
// while it renders, stream.js), and a history of this browser's tasks in localStorage. A request
// carries only what differs from the page's defaults.
import { ApiError, apiKey, events, json, request, setApiKey, upload } from "/studio/api.js";
import { changed, field, setSchemaDefault, valueOf } from "/studio/fields.js";
import { loadModels, wireModels } from "/studio/models.js";
import { chosenFiles, loadTasks, taskFields, useAsSource, wireSources } from "/studio/tasks.js";
import { fetchAudios, isStems, songFigure, stemsViews } from "/studio/results.js";
import { STREAM_FORMAT, canStream, handOver, liveFigure, streamable } from "/studio/stream.js";
import { wireTraining } from "/studio/train.js";

const form = document.getElementById("song");
const cards = document.getElementById("cards");
const HISTORY = "acestep.history";

// -- the schema: defaults and ranges of GenerateRequest --------------------------------------
function bounds(spec) {
  const options = [spec, ...(spec.anyOf || [])];
  const pick = (key) => options.map((o) => o[key]).find((v) => v !== undefined);
  return { min: pick("minimum"), max: pick("maximum"), def: spec.default };
}

async function applySchema() {
  const schema = await (await request("/openapi.json")).json();
  const properties = schema.paths["/v1/tasks"].post.requestBody.content["application/json"].schema.properties;
  for (const [name, spec] of Object.entries(properties)) {
    const input = field(name);
    if (!input || input instanceof RadioNodeList) continue;
    const { min, max, def } = bounds(spec);
    if (min !== undefined) input.min = min;
    if (max !== undefined) input.max = max;
    setSchemaDefault(input, def);
    if (spec.description) input.title = spec.description;
  }
  const seeds = properties.seeds;
  if (!field("seed").value) field("seed").value = -1;
  if (seeds && seeds.description) field("seed").title = seeds.description;
}

// -- the request -------------------------------------------------------------------------------
const NOT_SENT = new Set(["query", "seed", "task_type", "track", "stem_preset"]);

function body() {
  const out = taskFields();
  for (const input of form.querySelectorAll("input[name], textarea[name], select[name]")) {
    if (NOT_SENT.has(input.name) || input.disabled || !changed(input)) continue;
    out[input.name] = valueOf(input);
  }
  const seed = Number(field("seed").value);
  if (seed >= 0) Object.assign(out, { seeds: [seed], use_random_seed: false });
  if (canStream() && streamable(out)) out.stream_format = STREAM_FORMAT;  // heard while it renders
  return out;
}

function clearErrors() {
  form.querySelectorAll(".field-error").forEach((node) => node.remove());
  document.getElementById("form-error").hidden = true;
}

function showError(error) {
  const input = error.field && (field(error.field) || document.getElementById(error.field));
  if (input && input.closest) {
    const note = document.createElement("p");
    note.className = "field-error error";
    note.setAttribute("role", "alert");
    note.textContent = error.message;
    input.setAttribute("aria-invalid", "true");
    input.closest("label").after(note);
    input.focus();
    return;
  }
  const box = document.getElementById("form-error");
  box.textContent = error instanceof ApiError ? error.message : `Something went wrong: ${error.message}`;
  box.hidden = false;
}

function busy(seconds) {
  const box = document.getElementById("form-error");
  box.textContent = `The server is busy, retrying in ${seconds} s`;
  box.hidden = false;
}

// -- a generation card ------------------------------------------------------------------------
function bar(label) {
  const wrap = document.createElement("label");
  wrap.textContent = label;
  const meter = document.createElement("progress");
  meter.max = 1;
  meter.value = 0;
  wrap.append(meter);
  return [wrap, meter];
}

function newCard(taskId, caption) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.task = taskId;
  const title = document.createElement("h3");
  title.textContent = caption || "untitled";
  const phase = document.createElement("p");
  phase.className = "phase";
  const [lmWrap, lm] = bar("LM");
  const [ditWrap, dit] = bar("DiT");
  const plan = document.createElement("p");
  plan.className = "plan";
  const results = document.createElement("div");
  results.className = "results";
  card.append(title, phase, lmWrap, ditWrap, plan, results);
  cards.prepend(card);
  return { card, phase, lm, dit, plan, results, started: Date.now(), seen: new Set() };
}

function onEvent(view, event) {
  const seconds = ((Date.now() - view.started) / 1000).toFixed(1);
  const said = event.message && event.message !== event.phase ? ` · ${event.message}` : "";
  view.phase.textContent = `${event.phase}${said} · ${seconds} s`;
  view.card.dataset.phase = event.phase;
  view.seen.add(event.phase);
  view.card.dataset.seen = [...view.seen].join(",");
  const detail = event.detail || {};
  if (event.phase === "lm" && detail.tokens_expected) view.lm.value = Math.min(1, detail.tokens_done / detail.tokens_expected);
  if (["dit", "encode", "done"].includes(event.phase)) view.lm.value = 1;
  if (event.phase === "dit") view.dit.value = Math.min(1, Math.max(0, (event.progress - 0.3) / 0.6));
  if (["encode", "done"].includes(event.phase)) view.dit.value = 1;
  if (detail.plan) view.plan.textContent = describePlan(detail.plan);
}

function describePlan(plan) {
  return ["bpm", "keyscale", "timesignature", "duration", "caption"]
    .filter((key) => plan[key]).map((key) => `${key}: ${plan[key]}`).join(" · ");
}

async function showResult(view, taskId) {
  const status = await (await request(`/v1/tasks/${taskId}`)).json();
  if (status.phase === "failed") {
    view.phase.textContent = `failed: ${status.message}`;
    endLive(view);
    return status;
  }
  const fetched = await fetchAudios(view.results, status.result.audios);
  if (isStems(fetched)) {
    view.results.append(...stemsViews(taskId, fetched));
    endLive(view);
    return status;
  }
  const actions = [
    ["Same settings, new seed", () => submit({ ...view.request, seeds: undefined, use_random_seed: true }, view.files)],
    ["Use as source", (blob, item) => useAsSource(blob, item.key)],
    ["Extend", (blob, item) => extendFrom(blob, item.key)],
  ];
  for (const song of fetched) {
    const { item } = song;
    const description = `seed ${item.seed} · ${item.params.bpm || "?"} bpm · ${item.params.keyscale || "?"}${usedModels(status)}`;
    view.results.append(songFigure(song, description, actions));
  }
  endLive(view, view.results.querySelector("figure:not(.live) audio"));  // with the figures: one swap
  return status;
}

// The live player gives way to the song's file (``audio``), if the task streamed one.
function endLive(view, audio = null) {
  if (view.live) handOver(view.live, audio);
  view.live = null;
}

// A result becomes the source of an extension; with no length chosen yet, 30 s to the right.
async function extendFrom(blob, filename) {
  await useAsSource(blob, filename, "extend");
  const left = field("extend_left_s");
  const right = field("extend_right_s");
  if (!(Number(left.value) > 0) && !(Number(right.value) > 0)) right.value = 30;
}

// " · <DiT> · <adapter>@<scale>" of a finished task, as its result names them.
function usedModels(status) {
  const models = (status.result.metadata || {}).models || {};
  const adapters = (models.adapters || []).map(([name, scale]) => `${name}@${scale}`);
  return [models.dit, ...adapters].filter(Boolean).map((part) => ` · ${part}`).join("");
}

async function follow(view, taskId) {
  view.live = view.request && view.request.stream_format ? liveFigure(taskId) : null;
  if (view.live) view.results.append(view.live);
  for await (const event of events(`/v1/tasks/${taskId}/events`)) {
    onEvent(view, event);
    if (event.phase === "done" || event.phase === "failed") break;
  }
  const status = await showResult(view, taskId);
  remember({ task_id: taskId, caption: view.request.caption || "", phase: status.phase });
}

async function submit(request_body, files = {}) {
  clearErrors();
  try {
    const accepted = Object.keys(files).length ? await upload("/v1/tasks", request_body, files, busy)
      : await json("/v1/tasks", request_body, busy);
    document.getElementById("form-error").hidden = true;
    const view = newCard(accepted.task_id, request_body.caption || request_body.task_type);
    Object.assign(view, { request: request_body, files });
    remember({ task_id: accepted.task_id, caption: request_body.caption || "", phase: "queued" });
    await follow(view, accepted.task_id);
  } catch (error) {
    showError(error);
  }
}

// -- history ------------------------------------------------------------------------------------
function history() {
  try { return JSON.parse(localStorage.getItem(HISTORY) || "[]"); } catch { return []; }
}

function remember(entry) {
  const entries = history().filter((e) => e.task_id !== entry.task_id);
  localStorage.setItem(HISTORY, JSON.stringify([{ ...entry, at: Date.now() }, ...entries].slice(0, 50)));
  renderHistory();
}

async function renderHistory() {
  const list = document.getElementById("history");
  list.replaceChildren(...history().map((entry) => {
    const item = document.createElement("li");
    item.dataset.task = entry.task_id;
    item.dataset.phase = entry.phase;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "link";
    open.textContent = `${entry.caption || "untitled"} — ${entry.phase === "expired" ? "expired (no longer on the server)" : entry.phase}`;
    open.addEventListener("click", () => reopen(entry));
    item.append(open);
    return item;
  }));
}

// A history entry as a card again: its results, its progress if it still runs, or "expired".
async function reopen(entry) {
  const view = newCard(entry.task_id, entry.caption);
  view.request = { caption: entry.caption };
  if (entry.phase === "expired") {
    view.card.dataset.phase = "expired";
    view.phase.textContent = "expired: the server's retention has removed this result";
    return;
  }
  try { await follow(view, entry.task_id); } catch (error) {
    if (error.status !== 404) throw error;
    remember({ ...entry, phase: "expired" });
    view.card.dataset.phase = "expired";
    view.phase.textContent = "expired: the server's retention has removed this result";
  }
}

async function refreshHistory() {
  const entries = history();
  for (const entry of entries) {
    try {
      const status = await (await request(`/v1/tasks/${entry.task_id}`)).json();
      entry.phase = status.phase;
    } catch (error) {
      if (error.status === 404) entry.phase = "expired";
    }
  }
  localStorage.setItem(HISTORY, JSON.stringify(entries));
  renderHistory();
}

// -- LM helpers ---------------------------------------------------------------------------------
function fill(sample) {
  const values = { caption: sample.caption, lyrics: sample.lyrics, bpm: sample.bpm, duration: sample.duration,
                   keyscale: sample.keyscale, timesignature: sample.timesignature };
  for (const [name, value] of Object.entries(values)) if (value) field(name).value = value;
}

async function helper(path, payload) {
  clearErrors();
  try { fill(await json(path, payload, busy)); } catch (error) { showError(error); }
}

// -- wiring -------------------------------------------------------------------------------------
function start() {
  const key = document.getElementById("api-key");
  key.value = apiKey();
  key.addEventListener("change", () => { setApiKey(key.value); clearErrors(); setUp().catch(showError); });
  form.addEventListener("submit", (event) => { event.preventDefault(); submit(body(), chosenFiles()); });
  wireSources();
  wireTraining();
  wireModels((model) => loadTasks(model).catch(showError));  // a turbo DiT cannot serve lego/extract/complete
  form.querySelectorAll("[data-tag]").forEach((button) => button.addEventListener("click", () => {
    const lyrics = field("lyrics");
    lyrics.value = `${lyrics.value}${lyrics.value && !lyrics.value.endsWith("\n") ? "\n" : ""}${button.dataset.tag}\n`;
    lyrics.focus();
  }));
  document.getElementById("create-sample").addEventListener("click", () =>
    helper("/v1/create_sample", { query: field("query").value || "a song", instrumental: field("instrumental").checked }));
  document.getElementById("format-sample").addEventListener("click", () =>
    helper("/v1/format_sample", { caption: field("caption").value, lyrics: field("lyrics").value }));
  renderHistory();
  setUp().then(refreshHistory).catch(showError);
}

async function setUp() {
  await applySchema();
  await Promise.all([loadTasks(), loadModels()]);
}

start();
