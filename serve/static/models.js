// The model choice: which served DiT and LM render a song, and which DiT adapter (LoRA) at what
// scale. Lists come from GET /v1/info and GET /v1/adapters; a choice with one option is not shown.
import { request } from "/studio/api.js";

const form = document.getElementById("song");

function options(select, values, defaultLabel) {
  const first = Object.assign(document.createElement("option"), { value: "", textContent: defaultLabel });
  select.replaceChildren(first, ...values.map((value) => Object.assign(document.createElement("option"), { value, textContent: value })));
}

export async function loadModels() {
  const info = await (await request("/v1/info")).json();
  const dits = info.models.map((model) => model.name);
  options(form.elements.model, dits, `default (${info.default_model})`);
  options(form.elements.lm_model, info.lm_models, `default (${info.lm.model})`);
  form.elements.model.closest("label").hidden = dits.length < 2;
  form.elements.lm_model.closest("label").hidden = !info.lm.enabled || info.lm_models.length < 2;
  let adapters = [];
  if (info.adapters.dir_set) {
    const listed = await (await request("/v1/adapters")).json();
    adapters = listed.adapters.filter((adapter) => !adapter.error).map((adapter) => adapter.name);
  }
  options(form.elements.lora, adapters, "none (default)");
  for (const part of form.querySelectorAll("[data-adapters]")) part.hidden = adapters.length === 0;
  document.getElementById("models").hidden = dits.length < 2 && info.lm_models.length < 2 && adapters.length === 0;
  syncScale();
}

// lora_scale only goes with a chosen adapter: alone it would rescale the server's default adapter.
function syncScale() {
  form.elements.lora_scale.disabled = form.elements.lora.value === "";
}

export function wireModels() {
  form.elements.lora.addEventListener("change", syncScale);
}
