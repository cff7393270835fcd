// The task selector and the source files. The form changes with the task: only the task's own
// fields are shown and sent; tasks this app cannot serve are disabled with the server's reason
// (GET /v1/task_types, which also lists the output formats). The source is drawn as a waveform on
// which the repaint window is dragged. A result card can hand its audio back as a source (cover,
// repaint, extend).
import { request } from "/studio/api.js";
import { setDefault } from "/studio/fields.js";
import { decode, draw, peaks, windowPicker } from "/studio/wave.js";

const form = document.getElementById("song");
const canvas = document.getElementById("src-wave");
const files = { src_audio: null, reference_audio: null };
const source = { columns: [], duration: 0 };
let catalog = [];
let current = null;

// The tasks the chosen DiT (``model``; "": the app's choice per task) can serve.
export async function loadTasks(model = "") {
  const data = await (await request(`/v1/task_types${model ? `?model=${encodeURIComponent(model)}` : ""}`)).json();
  catalog = data.tasks;
  document.getElementById("task-types").replaceChildren(...catalog.map(taskOption));
  document.getElementById("track-names").replaceChildren(...data.track_names.map(trackOption));
  formatOptions(data.audio_formats);
  const kept = current && catalog.find((task) => task.task_type === current.task_type && task.servable);
  choose(kept ? kept.task_type : "text2music");
}

// The server's formats; the choice (or the schema's default) survives the new list.
function formatOptions(names) {
  const select = form.elements.audio_format;
  const chosen = select.value;
  select.replaceChildren(...names.map((name) => Object.assign(document.createElement("option"), { value: name, textContent: name })));
  if (select.dataset.default !== undefined) setDefault(select, select.dataset.default);
  if (names.includes(chosen)) select.value = chosen;
}

function taskOption(task) {
  const label = document.createElement("label");
  label.className = "inline task";
  const input = document.createElement("input");
  Object.assign(input, { type: "radio", name: "task_type", value: task.task_type, disabled: !task.servable });
  input.addEventListener("change", () => choose(task.task_type));
  label.append(input, task.task_type);
  if (!task.servable) {
    const why = document.createElement("small");
    why.className = "why";
    why.id = `why-${task.task_type}`;
    why.textContent = task.reason;
    input.setAttribute("aria-describedby", why.id);
    label.append(why);
  }
  return label;
}

function trackOption(name) {
  const label = document.createElement("label");
  label.className = "inline";
  const input = Object.assign(document.createElement("input"), { type: "checkbox", name: "track", value: name });
  label.append(input, name);
  return label;
}

// Show and enable the elements marked data-when="<catalog keys or task names>" (any of them) for
// this task.
export function choose(name) {
  current = catalog.find((task) => task.task_type === name) || catalog[0];
  form.querySelector(`input[name=task_type][value="${current.task_type}"]`).checked = true;
  const holds = (key) => (key in current ? Boolean(current[key]) : current.task_type === key);
  for (const element of form.querySelectorAll("[data-when]")) {
    const on = element.dataset.when.split(" ").some(holds);
    element.hidden = !on;
    if (element instanceof HTMLFieldSetElement) element.disabled = !on;
    else element.querySelectorAll("input, select, textarea").forEach((input) => { input.disabled = !on; });
  }
  redraw();
}

// task_type and the chosen tracks: extract and lego take them as ``tracks`` (a stem each, or a
// preset), complete as the instruction naming them (the official wording).
export function taskFields() {
  const out = { task_type: current.task_type };
  const names = [...form.querySelectorAll("input[name=track]:checked")].map((input) => input.value);
  const preset = form.elements.stem_preset.value;
  if (current.stems && (preset || names.length)) out.tracks = preset || names;
  else if (current.tracks && names.length) {
    out.instruction = current.track_instruction.replace("{tracks}", names.map((n) => n.toUpperCase()).join(current.track_join));
  }
  return out;
}

// The files this task sends: {src_audio, reference_audio} (only those chosen).
export function chosenFiles() {
  if (!current || !current.takes_source) return {};
  return Object.fromEntries(Object.entries(files).filter(([, file]) => file));
}

export async function setFile(name, file) {
  files[name] = file;
  const input = document.getElementById(name);
  if (input.files[0] !== file) {  // a dropped file or a result: show it in the file input too
    const transfer = new DataTransfer();
    transfer.items.add(file);
    input.files = transfer.files;
  }
  if (name !== "src_audio") return;
  const info = document.getElementById("src-info");
  try {
    const buffer = await decode(file);
    Object.assign(source, { columns: peaks(buffer, canvas.width), duration: buffer.duration });
    info.textContent = `${file.name}: ${buffer.duration.toFixed(1)} s`;
  } catch {
    Object.assign(source, { columns: [], duration: 0 });
    info.textContent = `${file.name}: this browser cannot decode it (the server may still read it)`;
  }
  canvas.dataset.duration = source.duration;
  redraw();
}

// A finished result becomes the source of a cover (or a repaint).
export async function useAsSource(blob, filename, task = "cover") {
  await setFile("src_audio", new File([blob], filename, { type: blob.type }));
  choose(task);
  form.scrollIntoView({ behavior: "smooth" });
}

function number(name) {
  const value = form.elements.namedItem(name).value;
  return value === "" ? null : Number(value);
}

function redraw() {
  const window = current && current.window ? { start: number("repainting_start") || 0, end: number("repainting_end") ?? -1 } : null;
  draw(canvas, source.columns, source.duration, window);
}

function dropZone(zone, name) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) setFile(name, event.dataTransfer.files[0]);
  });
  document.getElementById(name).addEventListener("change", (event) => {
    if (event.target.files.length) setFile(name, event.target.files[0]);
  });
}

export function wireSources() {
  dropZone(document.getElementById("src-drop"), "src_audio");
  dropZone(document.getElementById("ref-drop"), "reference_audio");
  windowPicker(canvas, () => source.duration, ({ start, end }) => {
    form.elements.namedItem("repainting_start").value = start;
    form.elements.namedItem("repainting_end").value = end;
    redraw();
  });
  for (const name of ["repainting_start", "repainting_end"]) form.elements.namedItem(name).addEventListener("input", redraw);
}
