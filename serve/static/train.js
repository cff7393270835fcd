// The "Train an adapter" panel: songs (picked or dropped, a caption each) uploaded into a named
// dataset, the dataset prepared, an adapter trained on it for a number of steps (step, loss and the
// loss curve while it runs; Stop), then exported under a name the model choice offers at once.
// A reload picks the key's latest run up again. Everything goes through the public routes (/v1/dataset/*, /v1/training/*), whose replies come in
// the official envelope ({data, code, error}).
import { ApiError, json, request } from "/studio/api.js";
import { refreshAdapters } from "/studio/models.js";

const panel = document.getElementById("train-form");
const songs = [];  // {file, caption: <input>}
const POLL_MS = 1000;
const NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-' (never a path)";
// The routes' field names -> the panel's inputs (a refusal is shown at the input it is about).
const INPUTS = { file: "train-files", dataset_name: "dataset_name", tensor_dir: "dataset_name",
                 lora_output_dir: "run_name", train_steps: "train_steps", export_path: "adapter_name" };
let run = "";  // the run being followed or exported

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const input = (name) => panel.elements.namedItem(name) || document.getElementById(name);

// A reply's data; an envelope that carries an error throws it (some routes answer 200 with one).
function data(body) {
  if (body.error || (body.code && body.code >= 400)) throw new Error(body.error || `code ${body.code}`);
  return body.data;
}

const get = async (path) => data(await (await request(path)).json());
const post = async (path, body) => data(await json(path, body, busy));

function state(name, text = "") {
  panel.dataset.state = name;
  document.getElementById("train-phase").textContent = text;
  document.getElementById("train-progress").hidden = false;
}

function busy(seconds) {
  document.getElementById("train-phase").textContent = `The server is busy, retrying in ${seconds} s`;
}

function clearError() {
  document.getElementById("train-error").hidden = true;
  panel.querySelectorAll("[aria-invalid]").forEach((node) => node.removeAttribute("aria-invalid"));
}

function showError(error) {
  const target = error instanceof ApiError && error.field ? input(INPUTS[error.field] || error.field) : null;
  const label = target && target.closest("label") ? target.closest("label").firstChild.textContent.trim() : "";
  if (target) target.setAttribute("aria-invalid", "true");
  const box = document.getElementById("train-error");
  box.textContent = label ? `${label}: ${error.message}` : error.message;
  box.hidden = false;
}

// -- the songs ----------------------------------------------------------------------------------
function addSongs(files) {
  for (const file of files) {
    if (songs.some((song) => song.file.name === file.name && song.file.size === file.size)) continue;
    const caption = Object.assign(document.createElement("input"), { placeholder: "caption (optional)" });
    caption.setAttribute("aria-label", `Caption of ${file.name}`);
    songs.push({ file, caption });
  }
  renderSongs();
}

function renderSongs() {
  document.getElementById("train-songs").replaceChildren(...songs.map((song, index) => {
    const item = document.createElement("li");
    const remove = Object.assign(document.createElement("button"), { type: "button", className: "link", textContent: "Remove" });
    remove.setAttribute("aria-label", `Remove ${song.file.name}`);
    remove.addEventListener("click", () => { songs.splice(index, 1); renderSongs(); });
    item.append(song.file.name, " ", remove, song.caption);
    return item;
  }));
}

// -- the run ------------------------------------------------------------------------------------
async function uploadSongs(dataset) {
  let reply = null;
  for (const [index, song] of songs.entries()) {
    state("uploading", `uploading ${index + 1} of ${songs.length}: ${song.file.name}`);
    const form = new FormData();
    form.append("file", song.file, song.file.name);
    form.append("dataset_name", dataset);
    if (song.caption.value.trim()) form.append("caption", song.caption.value.trim());
    reply = data(await (await request("/v1/dataset/upload", { method: "POST", body: form }, busy)).json());
  }
  return reply.num_samples;
}

async function prepare(dataset, total) {
  const started = await post("/v1/dataset/preprocess_async", { dataset_name: dataset });
  for (;;) {
    const status = await get(`/v1/dataset/preprocess_status/${started.task_id}`);
    state("preparing", `preparing ${dataset}: ${status.current} of ${status.total || total} songs`);
    if (status.status === "failed") throw new Error(`preparing ${dataset} failed: ${status.error}`);
    if (status.status === "completed") return status.result;
    await sleep(POLL_MS);
  }
}

// The loss per step as a line scaled to the canvas (lowest loss at the bottom); the canvas says
// how many points it shows (data-points) and their range in its label.
function drawLoss(canvas, history) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  canvas.dataset.points = history.length;
  if (!history.length) return;
  const losses = history.map((point) => point.loss);
  const low = Math.min(...losses), high = Math.max(...losses), pad = 8;
  const x = (index) => pad + (history.length > 1 ? index / (history.length - 1) : 0.5) * (width - 2 * pad);
  const y = (loss) => height - pad - (high > low ? (loss - low) / (high - low) : 0.5) * (height - 2 * pad);
  g.strokeStyle = "#2f5bd3";
  g.fillStyle = "#2f5bd3";
  g.lineWidth = 2;
  g.beginPath();
  losses.forEach((loss, index) => (index ? g.lineTo(x(index), y(loss)) : g.moveTo(x(index), y(loss))));
  g.stroke();
  losses.forEach((loss, index) => g.fillRect(x(index) - 2, y(loss) - 2, 4, 4));
  canvas.setAttribute("aria-label", `Training loss per step: ${history.length} points, from ${losses[0].toFixed(4)} `
    + `to ${losses.at(-1).toFixed(4)} (lowest ${low.toFixed(4)})`);
}

function showProgress(status, steps) {
  const step = status.current_step || 0;
  const loss = status.current_loss;
  document.getElementById("train-bar").value = steps ? Math.min(1, step / steps) : 0;
  document.getElementById("train-loss").textContent =
    `step ${step} of ${steps}${loss === null || loss === undefined ? "" : ` · loss ${loss.toFixed(4)}`}`;
  drawLoss(document.getElementById("loss-curve"), status.loss_history || []);
}

async function follow(steps) {
  for (;;) {
    const status = await get("/v1/training/status");
    showProgress(status, steps);
    if (!status.is_training) return status;
    state("training", `training ${run}`);
    await sleep(POLL_MS);
  }
}

function ended(status) {
  document.getElementById("train-stop").hidden = true;
  if (status.phase === "done") {
    state("done", `trained ${run}: export it to use it`);
    input("adapter_name").value = run;
    document.getElementById("train-export").hidden = false;
  } else if (status.error === "cancelled") {
    state("stopped", `stopped ${run} at step ${status.current_step || 0}`);
  } else {
    throw new Error(`training ${run} failed: ${status.status || status.error}`);
  }
}

// The names' and steps' rules checked before anything is uploaded (the server checks them again).
const RULES = { valueMissing: "required", patternMismatch: NAME_RULE, rangeUnderflow: "at least 1",
                stepMismatch: "a whole number", badInput: "a whole number" };

function invalid(names) {
  for (const name of names) {
    const target = input(name);
    const broken = Object.keys(RULES).find((key) => target.validity[key]);
    if (broken) return new ApiError(422, [{ loc: [name], msg: RULES[broken] }]);
  }
  return null;
}

async function train(event) {
  event.preventDefault();
  clearError();
  if (!songs.length) return showError(new Error("Pick at least one song to train on."));
  const refused = invalid(["dataset_name", "run_name", "train_steps"]);
  if (refused) return showError(refused);
  const dataset = input("dataset_name").value.trim();
  const steps = Number(input("train_steps").value);
  run = input("run_name").value.trim();
  document.getElementById("train-export").hidden = true;
  await whileRunning(async () => {
    const held = await uploadSongs(dataset);
    const prepared = await prepare(dataset, held);
    const failed = prepared.failed.length ? `, ${prepared.failed.length} could not be read` : "";
    state("starting", `${dataset}: ${prepared.num_tensors} songs prepared${failed}; starting`);
    await post("/v1/training/start", { tensor_dir: dataset, lora_output_dir: run, train_steps: steps });
    await followToTheEnd(steps);
  });
}

// Train is held while ``work`` runs; a failure is shown, and Stop goes away once it is over.
async function whileRunning(work) {
  document.getElementById("train-start").disabled = true;
  try {
    await work();
  } catch (error) {
    panel.dataset.state = "failed";
    showError(error);
  } finally {
    document.getElementById("train-stop").hidden = true;
    document.getElementById("train-start").disabled = false;
  }
}

async function followToTheEnd(steps) {
  document.getElementById("train-stop").hidden = false;
  ended(await follow(steps));
}

async function stop() {
  document.getElementById("train-phase").textContent = `stopping ${run}`;
  try { await post("/v1/training/stop", {}); } catch (error) { showError(error); }
}

async function exportAdapter() {
  clearError();
  const name = input("adapter_name").value.trim();
  const refused = invalid(["adapter_name"]);
  if (refused) return showError(refused);
  try {
    await post("/v1/training/export", { export_path: name, lora_output_dir: run });
    await refreshAdapters();
    document.getElementById("export-note").textContent = `Exported as ${name}: choose it under Models, Adapter.`;
    panel.dataset.exported = name;
  } catch (error) {
    showError(error);
  }
}

// The key's latest run, picked up again when the page loads (after a reload, or started in another
// tab): followed while it trains, offered for export once done. Without a key (401) or a run: nothing.
async function resume() {
  let status;
  try { status = await get("/v1/training/status"); } catch { return; }
  if (!status || !status.task_id || !(status.is_training || status.phase === "done")) return;
  run = status.output_dir;
  const steps = (status.config || {}).steps || status.current_step || 0;
  if (!status.is_training) {
    showProgress(status, steps);
    return ended(status);
  }
  document.getElementById("train").open = true;
  await whileRunning(() => followToTheEnd(steps));
}

export function wireTraining() {
  const zone = document.getElementById("train-drop");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addSongs(event.dataTransfer.files);
  });
  input("train-files").addEventListener("change", (event) => { addSongs(event.target.files); event.target.value = ""; });
  panel.addEventListener("submit", train);
  document.getElementById("train-stop").addEventListener("click", stop);
  document.getElementById("export").addEventListener("click", exportAdapter);
  resume();
}
