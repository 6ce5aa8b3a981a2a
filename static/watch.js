// The watch page at GET /watch/<fileId>: plays a recording while it is being made, then the
// processed video. Three sources, in order:
//   1. the live stream, GET /uploads/<fileId>.<ext>?live=1 (live.py): the bytes so far, then
//      each chunk's bytes as the server appends them, fed to MediaSource (a progressive <video
//      src> where MediaSource cannot take the type); the page keeps near the newest bytes;
//   2. once the stream ends at completion, the same bytes, whole: the recording plays to its end;
//   3. once the server says `ready`, its playbackUrl (a seekable copy), at the same position.
// What the server reports comes from its event stream (m1client.js watchUpload). A server with
// --api-key needs a read token: open the page as /watch/<fileId>?token=<token>.
import { watchUpload, getStatus, withToken } from "/m1client.js";
import { formatBytes, showMessage as show } from "/ui.js";

const FILE_ID = decodeURIComponent(location.pathname.split("/").pop());
const TOKEN = new URLSearchParams(location.search).get("token") ||
              new URLSearchParams(location.hash.slice(1)).get("token") || null;
const HEADERS = TOKEN ? { Authorization: "Bearer " + TOKEN } : {};
const LIVE_LAG_MAX_S = 2.0;       // further behind the newest byte than this: jump ahead
const LIVE_LAG_TARGET_S = 0.6;    // ... to this far behind it
const KEEP_BEHIND_S = 300;        // buffered media further back than this is let go
const RETRY_MS = 1000;            // the upload does not exist yet, or the stream broke
const BUSY_RETRY_MS = 5000;       // 503: too many live viewers

const $ = (id) => document.getElementById(id);
const ui = { watch: $("watch"), player: $("player"), badge: $("live-badge"), state: $("state"),
             bytes: $("bytes"), mode: $("mode"), message: $("message"), id: $("upload-id") };

let started = false;              // the live stream (or the processed video) is playing
let processedUrl = null;          // set once: the page never goes back to the live stream
let liveStream = null;            // { abort() } of the running live stream

// --- what the server reports -----------------------------------------------------------------

function onEvent(event) {
  if (event.type === "state") showStatus(event.status);
  else if (event.type === "chunk") {
    showBytes(event.bytesReceived);
    setState("uploading");
    if (!started) getStatus("", FILE_ID, HEADERS).then(showStatus, () => {});
  } else if (event.type === "completed") {
    showBytes(event.size);
    setState("completed");
  } else if (event.type === "processing") {
    setState("processing", `processing: ${Math.round((event.progress || 0) * 100)}%`);
  } else if (event.type === "ready") {
    setState("ready");
    if (event.playbackUrl) playProcessed(event.playbackUrl);
  } else if (event.type === "failed") {
    setState("failed", `failed: ${event.reason}`);
  } else if (event.type === "deleted") {
    setState("deleted");
    showMessage("The upload was deleted.", "error");
  } else if (event.type === "token_expired") {
    showMessage("The token expired: open the page with a new one.", "error");
  }
}

function showStatus(status) {
  if (!status) return;
  if (!status.exists) {
    setState("waiting", "waiting for the recording to start");
    return;
  }
  showBytes(status.fileSize);
  const processing = status.processing && status.processing.state;
  if (status.state !== "completed") setState("uploading");
  else if (processing === "done") setState("ready");
  else if (processing === "failed") setState("failed", `failed: ${status.processing.error}`);
  else setState("completed");
  if (status.state === "completed" && status.playbackUrl && processing === "done") {
    playProcessed(status.playbackUrl);
  } else if (!started) {
    playLive(status);
  }
}

function setState(state, text) {
  ui.watch.dataset.state = state;
  ui.state.textContent = text || state;
}

function showBytes(bytes) {
  const most = Math.max(Number(ui.watch.dataset.serverBytes || 0), bytes || 0);
  ui.watch.dataset.serverBytes = String(most);
  ui.bytes.textContent = formatBytes(most);
}

function setMode(mode, text) {
  ui.watch.dataset.mode = mode;
  ui.mode.textContent = text;
  ui.badge.hidden = mode !== "live";
}

// --- 1 and 2: the live stream -------------------------------------------------------------------

function playLive(status) {
  started = true;
  const url = withToken(status.url + "?live=1", TOKEN);
  const type = mediaSourceType(status.mimeType);
  if (typeof MediaSource !== "undefined" && type && MediaSource.isTypeSupported(type)) {
    liveStream = streamIntoMediaSource(url, type);
  } else {
    playProgressive(url);
  }
}

/** Without MediaSource for this type (e.g. "video/mp4" with no codecs, as Safari says): the
 * browser plays the growing file as it comes, and its end when the stream ends. */
function playProgressive(url) {
  ui.player.src = url;
  ui.player.play().catch(() => {});
  ui.player.addEventListener("ended", () => {
    if (ui.watch.dataset.mode === "live") setMode("ended", "the whole recording");
  });
  setMode("live", "live (progressive)");
}

/** MediaRecorder's "video/webm;codecs=vp8,opus" as MediaSource wants it. */
function mediaSourceType(mimeType) {
  if (!mimeType) return null;
  const [base, ...params] = mimeType.split(";").map((s) => s.trim());
  const codecs = params.find((p) => p.toLowerCase().startsWith("codecs="));
  return codecs ? `${base}; codecs="${codecs.slice(7).replace(/"/g, "")}"` : base;
}

function streamIntoMediaSource(url, type) {
  const controller = new AbortController();
  const source = new MediaSource();
  const pending = [];                     // fetched bytes not yet appended
  let buffer = null, finished = false, received = 0;
  ui.player.src = URL.createObjectURL(source);

  function pump() {
    if (!buffer || buffer.updating || source.readyState !== "open") return;
    if (pending.length) {
      const bytes = pending.length === 1 ? pending[0] : concat(pending);
      pending.length = 0;
      buffer.appendBuffer(bytes);
    } else if (finished) {
      source.endOfStream();               // the whole recording is here: it plays to its end
      setMode("ended", "the whole recording (the upload is complete)");
    } else {
      trimBehind();
    }
  }

  function trimBehind() {
    const ranges = buffer.buffered;
    if (ranges.length && ui.player.currentTime - ranges.start(0) > KEEP_BEHIND_S * 1.5) {
      buffer.remove(0, ui.player.currentTime - KEEP_BEHIND_S);
    }
  }

  source.addEventListener("sourceopen", async () => {
    try {
      buffer = source.addSourceBuffer(type);
    } catch (error) {                     // the type said yes, the buffer says no
      playProgressive(url);
      return;
    }
    buffer.addEventListener("updateend", () => { keepUp(); pump(); });
    try {
      const response = await fetch(url, { signal: controller.signal, cache: "no-store" });
      if (response.status !== 200) throw await replyError(response);
      setMode("live", "live");
      const reader = response.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        received += value.length;
        ui.watch.dataset.liveBytes = String(received);
        pending.push(value);
        pump();
      }
      finished = true;
      pump();
    } catch (error) {
      if (controller.signal.aborted) return;
      showMessage(`Live stream: ${error.message}. Trying again…`, "info");
      started = false;
      setTimeout(() => getStatus("", FILE_ID, HEADERS).then(showStatus, () => {}),
                 error.status === 503 ? BUSY_RETRY_MS : RETRY_MS);
    }
  }, { once: true });
  return { abort: () => controller.abort() };
}

/** Stay near the newest bytes: a viewer who opens the page late, or fell behind, jumps ahead
 * (a live recording is watched as it happens; the processed copy is there to go back). */
function keepUp() {
  const ranges = ui.player.buffered;
  if (ui.watch.dataset.mode !== "live" || !ranges.length) return;
  const newest = ranges.end(ranges.length - 1);
  if (newest - ui.player.currentTime > LIVE_LAG_MAX_S) {
    ui.player.currentTime = Math.max(0, newest - LIVE_LAG_TARGET_S);
  }
  if (ui.player.paused && !ui.watch.dataset.userPaused) ui.player.play().catch(() => {});
}

// --- 3: the processed video ---------------------------------------------------------------------

function playProcessed(url) {
  if (processedUrl) return;
  processedUrl = url;
  started = true;
  const player = ui.player;
  const at = player.ended ? 0 : player.currentTime;
  const playing = !player.paused && !player.ended;
  if (liveStream) liveStream.abort();
  player.src = withToken(url, TOKEN);
  player.addEventListener("loadedmetadata", () => {
    if (at > 0 && at < player.duration) player.currentTime = at;
    if (playing) player.play().catch(() => {});
  }, { once: true });
  setMode("playback", "the processed video (seekable)");
}

// --- helpers ------------------------------------------------------------------------------

async function replyError(response) {
  let message = `HTTP ${response.status}`;
  try { message = (await response.json()).error.message; } catch (error) { /* not JSON */ }
  return Object.assign(new Error(message), { status: response.status });
}

function showMessage(text, kind) { show(ui.message, text, kind); }

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) { out.set(part, at); at += part.length; }
  return out;
}

ui.id.textContent = FILE_ID;
ui.player.addEventListener("pause", () => {        // only a person pauses (stalls do not)
  if (!ui.player.ended) ui.watch.dataset.userPaused = "1";
});
ui.player.addEventListener("play", () => { delete ui.watch.dataset.userPaused; });
watchUpload("", FILE_ID, onEvent, { token: TOKEN, headers: HEADERS });
