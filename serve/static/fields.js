// Which form values a request carries, and as what JSON type. The page fills inputs with defaults
// (the schema's, or the picked model's preset); a field still at the default the page put there is
// not sent, so the server applies its own -- for a preset, that of the model it renders with.

const form = document.getElementById("song");

export function field(name) {
  return form.elements.namedItem(name);
}

function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

// Show `value` in `input` as the page's default (not sent while it stays so).
export function setDefault(input, value) {
  if (input.type === "checkbox") {
    input.checked = value === true || value === "true";
    input.dataset.default = String(input.checked);
    return;
  }
  input.value = text(value);
  input.dataset.default = input.value;
}

// A select whose first option is "" offers the server's (the model's) default by name: it keeps
// that option rather than showing the schema's value.
export function offersModelDefault(input) {
  return input instanceof HTMLSelectElement && input.options.length > 0 && input.options[0].value === "";
}

// The schema's default, kept to return to when a model without a preset is picked. An input the
// user already set keeps its value.
export function setSchemaDefault(input, value) {
  if (offersModelDefault(input)) return;
  input.dataset.schema = input.type === "checkbox" ? String(Boolean(value)) : text(value);
  const fresh = !("default" in input.dataset);
  const untouched = fresh ? input.type === "checkbox" || input instanceof HTMLSelectElement || input.value === ""
    : !changed(input);
  if (untouched) setDefault(input, value);
}

// Whether `input` differs from the page's default: the user (or an LM helper, or a drag on the
// waveform) set it. Without a recorded default, any value counts; an empty one never does.
export function changed(input) {
  if (input.type === "checkbox") return !("default" in input.dataset) || String(input.checked) !== input.dataset.default;
  if (input.value === "") return false;
  if (!input.dataset.default) return true;
  if (input.type === "number") return Number(input.value) !== Number(input.dataset.default);
  return input.value !== input.dataset.default;
}

// The value as the request's JSON type: numbers, booleans ("on"/"off" selects), and seeds that
// may be one integer or several separated by commas.
export function valueOf(input) {
  if (input.type === "checkbox") return input.checked;
  if (input.type === "number") return Number(input.value);
  if (input.dataset.type === "boolean") return input.value === "true";
  if (input.dataset.type === "seed" && /^\s*-?\d+\s*$/.test(input.value)) return Number(input.value);
  return input.value;
}
