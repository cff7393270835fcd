// The model choice: which served DiT and LM render a song, and which DiT adapter (LoRA) at what
// scale. Lists come from GET /v1/info and GET /v1/adapters; a choice with one option is not shown.
// A DiT's preset (its "preset" in GET /v1/models) becomes the default of the fields it names.
import { request } from "/studio/api.js";
import { changed, field, offersModelDefault, setDefault } from "/studio/fields.js";

const form = document.getElementById("song");
const presets = new Map();  // served DiT name -> its preset
let defaultModel = "";
const served = { dits: 0, lms: 0, adaptersDir: false };  // what GET /v1/info said

function options(select, values, defaultLabel) {
  const first = Object.assign(document.createElement("option"), { value: "", textContent: defaultLabel });
  select.replaceChildren(first, ...values.map((value) => Object.assign(document.createElement("option"), { value, textContent: value })));
}

export async function loadModels() {
  const info = await (await request("/v1/info")).json();
  const dits = info.models.map((model) => model.name);
  defaultModel = info.default_model;
  options(form.elements.model, dits, `default (${info.default_model})`);
  options(form.elements.lm_model, info.lm_models, `default (${info.lm.model})`);
  form.elements.model.closest("label").hidden = dits.length < 2;
  form.elements.lm_model.closest("label").hidden = !info.lm.enabled || info.lm_models.length < 2;
  Object.assign(served, { dits: dits.length, lms: info.lm_models.length, adaptersDir: info.adapters.dir_set });
  await refreshAdapters();
  await loadPresets();
  applyPreset();
}

// The adapter directory's adapters as the choice (again after one was added); a chosen one stays.
export async function refreshAdapters() {
  let adapters = [];
  if (served.adaptersDir) {
    const listed = await (await request("/v1/adapters")).json();
    adapters = listed.adapters.filter((adapter) => !adapter.error).map((adapter) => adapter.name);
  }
  const chosen = form.elements.lora.value;
  options(form.elements.lora, adapters, "none (default)");
  if (adapters.includes(chosen)) form.elements.lora.value = chosen;
  for (const part of form.querySelectorAll("[data-adapters]")) part.hidden = adapters.length === 0;
  document.getElementById("models").hidden = served.dits < 2 && served.lms < 2 && adapters.length === 0;
  syncScale();
}

async function loadPresets() {
  const listed = await (await request("/v1/models")).json();
  presets.clear();
  for (const entry of listed.data) if (entry.preset) presets.set(entry.id.replace(/^acestep\//, ""), entry.preset);
}

function shown(value) {
  return value === true ? "on" : value === false ? "off" : String(value);
}

// The picked DiT's preset as the default of each field it names (a field the user set keeps its
// value; a model without one brings back the schema's). A "model default" option names the value.
function applyPreset() {
  const name = form.elements.model.value || defaultModel;
  const preset = presets.get(name) || {};
  const named = new Set([...presets.values()].flatMap((each) => Object.keys(each)));
  for (const key of named) {
    const input = field(key);
    if (!input || input instanceof RadioNodeList) continue;
    if (offersModelDefault(input)) {
      input.options[0].textContent = key in preset ? `model default (${shown(preset[key])})` : "model default";
    } else if (!changed(input)) {
      setDefault(input, key in preset ? preset[key] : input.dataset.schema);
    }
  }
  const note = document.getElementById("preset");
  const parts = Object.entries(preset).map(([key, value]) => `${key.replaceAll("_", " ")} ${shown(value)}`);
  note.textContent = `Defaults of ${name}: ${parts.join(" · ")}`;
  note.hidden = parts.length === 0;
}

// lora_scale only goes with a chosen adapter: alone it would rescale the server's default adapter.
function syncScale() {
  form.elements.lora_scale.disabled = form.elements.lora.value === "";
}

// ``onModel(name)``: the picked DiT changed ("" for the app's default choice).
export function wireModels(onModel = () => {}) {
  form.elements.lora.addEventListener("change", syncScale);
  form.elements.model.addEventListener("change", () => { applyPreset(); onModel(form.elements.model.value); });
}
