// A song played while it renders: the task's MP3 stream (GET /v1/tasks/{id}/stream) fetched with
// the key like every other call and fed to an audio element through MediaSource (an <audio src>
// could not send the key). Where MediaSource cannot take MP3 the studio asks for no stream and
// plays the file once the task is done.
import { request } from "/studio/api.js";

const TYPE = "audio/mpeg";
export const STREAM_FORMAT = "mp3";

export function canStream() {
  return typeof MediaSource !== "undefined" && MediaSource.isTypeSupported(TYPE);
}

// Tasks whose songs the server streams (not extensions, not stems).
export function streamable(body) {
  return body.task_type !== "extend" && !body.tracks;
}

// A figure whose player plays song ``index`` of the task as its audio arrives (it starts by itself
// where the browser lets a page play).
export function liveFigure(taskId, index = 0) {
  const audio = Object.assign(document.createElement("audio"), { controls: true, className: "live" });
  const source = new MediaSource();
  audio.src = URL.createObjectURL(source);
  source.addEventListener("sourceopen", () => feed(source, audio, taskId, index).catch(() => {}), { once: true });
  const caption = Object.assign(document.createElement("figcaption"), { textContent: "Live: plays while it renders" });
  const figure = document.createElement("figure");
  figure.className = "live";
  figure.append(caption, audio);
  return figure;
}

async function feed(source, audio, taskId, index) {
  const buffer = source.addSourceBuffer(TYPE);
  buffer.mode = "sequence";  // MP3 carries no timestamps: each append follows the last
  const response = await request(`/v1/tasks/${taskId}/stream?index=${index}`);
  const reader = response.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    await append(buffer, value);
    audio.dataset.received = String(Number(audio.dataset.received || 0) + value.length);
    if (!audio.dataset.started) {
      audio.dataset.started = "1";
      audio.play().catch(() => {});  // without a user gesture the browser may refuse: the controls stay
    }
  }
  if (source.readyState === "open") source.endOfStream();
}

function append(buffer, bytes) {
  return new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", reject, { once: true });
    buffer.appendBuffer(bytes);
  });
}

// Once the task's file is on the card it takes over (``audio``: its player, none when it failed):
// at the live player's position, playing if the live one was.
export function handOver(figure, audio) {
  const live = figure.querySelector("audio");
  if (audio && !live.paused && !live.ended) {
    audio.currentTime = live.currentTime;
    audio.play().catch(() => {});
  }
  live.pause();
  figure.remove();
}
