// Waveforms: an audio file decoded by the browser, drawn as min/max peaks on a canvas, with an
// optional time window that the user drags out with the mouse, a finger or a pen.

const INK = "#2f5bd3";
const WINDOW = "rgba(47, 91, 211, 0.18)";

export async function decode(blob) {
  const context = new AudioContext();
  try {
    return await context.decodeAudioData(await blob.arrayBuffer());
  } finally {
    context.close();
  }
}

// [min, max] of the first channel per pixel column.
export function peaks(buffer, columns) {
  const data = buffer.getChannelData(0);
  const step = Math.max(1, Math.floor(data.length / columns));
  const out = [];
  for (let column = 0; column < columns; column++) {
    let low = 0, high = 0;
    for (let i = column * step; i < Math.min(data.length, (column + 1) * step); i++) {
      if (data[i] < low) low = data[i];
      if (data[i] > high) high = data[i];
    }
    out.push([low, high]);
  }
  return out;
}

// Draw peaks and, when given, the window [start, end) in seconds of a `duration`-second file.
export function draw(canvas, columns, duration = 0, window = null) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  if (window && duration > 0) {
    const end = window.end < 0 ? duration : window.end;
    g.fillStyle = WINDOW;
    g.fillRect((window.start / duration) * width, 0, ((end - window.start) / duration) * width, height);
  }
  g.fillStyle = INK;
  const mid = height / 2;
  columns.forEach(([low, high], x) => g.fillRect(x, mid - high * mid, 1, Math.max(1, (high - low) * mid)));
}

// Picture of a whole file (used for results).
export async function picture(canvas, blob) {
  const buffer = await decode(blob);
  draw(canvas, peaks(buffer, canvas.width));
  return buffer;
}

// Let the user drag a window on `canvas`; onChange({start, end}) in seconds, 0.1 s steps.
export function windowPicker(canvas, durationOf, onChange) {
  let anchor = null;
  const seconds = (event) => {
    const box = canvas.getBoundingClientRect();
    const fraction = Math.min(1, Math.max(0, (event.clientX - box.left) / box.width));
    return Math.round(fraction * durationOf() * 10) / 10;
  };
  const report = (event) => {
    const at = seconds(event);
    onChange({ start: Math.min(anchor, at), end: Math.max(anchor, at) });
  };
  canvas.addEventListener("pointerdown", (event) => {
    if (!durationOf()) return;
    anchor = seconds(event);
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => { if (anchor !== null) report(event); });
  canvas.addEventListener("pointerup", (event) => {
    if (anchor === null) return;
    report(event);
    anchor = null;
  });
}
