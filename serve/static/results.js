// A finished task's audio on its card: a figure per song (player, waveform, download and the
// follow-ups: new seed, use as source, extend), or, when the audios are stems (each labelled with
// its track), one stems view: a row per stem with its waveform, mute and solo, one transport that
// plays them together, and every stem in one zip (GET /v1/tasks/{id}/audios.zip).
import { audioBlob } from "/studio/api.js";
import { picture } from "/studio/wave.js";

// [{item, blob}] of the task's audios; an item no longer stored gets a note on the card instead.
export async function fetchAudios(results, items) {
  const fetched = [];
  for (const item of items) {
    try { fetched.push({ item, blob: await audioBlob(item.url) }); } catch (error) {
      if (error.status !== 404) throw error;
      results.append(Object.assign(document.createElement("p"), { className: "expired", textContent: `${item.key}: expired (no longer stored)` }));
    }
  }
  return fetched;
}

function button(text, onClick) {
  const node = Object.assign(document.createElement("button"), { type: "button", textContent: text });
  node.addEventListener("click", onClick);
  return node;
}

function wave(blob, label) {
  const canvas = Object.assign(document.createElement("canvas"), { width: 600, height: 64, className: "wave" });
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `Waveform of ${label}`);
  picture(canvas, blob).then(() => { canvas.dataset.drawn = "1"; }).catch(() => canvas.remove());
  return canvas;
}

// One song: ``actions`` are [label, handler(blob, item)] pairs for its follow-up buttons.
export function songFigure({ item, blob }, description, actions) {
  const url = URL.createObjectURL(blob);
  const audio = Object.assign(document.createElement("audio"), { controls: true, src: url });
  const link = Object.assign(document.createElement("a"), { href: url, download: item.key, textContent: `Download ${item.format}` });
  const meta = Object.assign(document.createElement("p"), { textContent: description });
  const figure = document.createElement("figure");
  figure.append(wave(blob, item.key), audio, meta, link, ...actions.map(([label, run]) => button(label, () => run(blob, item))));
  return figure;
}

export function isStems(fetched) {
  return fetched.length > 1 && fetched.every(({ item }) => item.track);
}

// A task's stems, one view per song (its seed): the audios come track by track, each track's songs
// in seed order.
export function stemsViews(taskId, fetched) {
  const songs = new Map();
  for (const stem of fetched) {
    if (!songs.has(stem.item.seed)) songs.set(stem.item.seed, []);
    songs.get(stem.item.seed).push(stem);
  }
  return [...songs.entries()].map(([seed, stems], index) =>
    stemsView(taskId, stems, songs.size > 1 ? `Song ${index + 1} (seed ${seed})` : ""));
}

// The stems of one song: mute silences a stem, solo plays only the soloed ones (several may be).
function stemsView(taskId, fetched, title) {
  const view = document.createElement("section");
  view.className = "stems";
  view.setAttribute("aria-label", title ? `Stems of ${title}` : "Stems");
  if (title) view.append(Object.assign(document.createElement("h4"), { textContent: title }));
  const muted = new Set();
  const soloed = new Set();
  const rows = fetched.map(({ item, blob }) => stemRow(item, blob, muted, soloed, () => apply()));
  const audios = rows.map((row) => row.audio);
  function apply() {
    for (const row of rows) {
      const audible = soloed.size ? soloed.has(row.name) : !muted.has(row.name);
      row.audio.muted = !audible;
      row.node.dataset.audible = audible ? "1" : "0";
    }
  }
  const play = button("Play all", () => {
    if (audios.some((audio) => !audio.paused)) {
      audios.forEach((audio) => audio.pause());
      play.textContent = "Play all";
      return;
    }
    const at = audios[0].currentTime;
    audios.forEach((audio) => { audio.currentTime = at; audio.play().catch(() => {}); });
    play.textContent = "Pause";
  });
  audios[0].addEventListener("ended", () => { play.textContent = "Play all"; });
  const zip = button("Download all (zip)", async () => {
    const link = Object.assign(document.createElement("a"), { download: `${taskId}.zip` });
    link.href = URL.createObjectURL(await audioBlob(`/v1/tasks/${taskId}/audios.zip`));
    link.click();
  });
  zip.className = "download-all";
  const transport = document.createElement("div");
  transport.className = "transport";
  transport.append(play, zip);
  view.append(transport, ...rows.map((row) => row.node));
  apply();
  return view;
}

function stemRow(item, blob, muted, soloed, apply) {
  const name = item.track;
  const node = document.createElement("div");
  node.className = "stem";
  node.dataset.track = name;
  const label = Object.assign(document.createElement("strong"), { textContent: name });
  const audio = Object.assign(document.createElement("audio"), { src: URL.createObjectURL(blob), preload: "auto" });
  const toggle = (text, set) => {
    const control = button(text, () => {
      if (set.has(name)) set.delete(name); else set.add(name);
      control.setAttribute("aria-pressed", String(set.has(name)));
      apply();
    });
    control.setAttribute("aria-pressed", "false");
    control.setAttribute("aria-label", `${text} ${name}`);
    return control;
  };
  node.append(label, toggle("Mute", muted), toggle("Solo", soloed), wave(blob, name), audio);
  return { name, node, audio };
}
