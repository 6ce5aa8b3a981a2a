// The demo page at GET /: everything it does goes through m1client.js (ui.js: small helpers
// it shares with the watch page and the dashboard).
import { M1Recorder, findPendingUploads, resumePendingUpload, discardPendingUpload, withToken }
  from "/m1client.js";
import { button, formatBytes, showMessage as show } from "/ui.js";

const SERVER_URL = "";                       // this page's own server
const RECORDINGS_KEY = "m1demo.recordings";  // recordings made in this browser (localStorage)
const MAX_REMEMBERED = 50;
// A server with --api-key: open the page as /#token=<token>&fileId=<id> (a fragment never
// reaches a server or a Referer). The token comes from your backend (POST /api/video/tokens).
const PAGE_AUTH = Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
const AUTH = PAGE_AUTH.token ? { token: PAGE_AUTH.token, fileId: PAGE_AUTH.fileId } : {};

const $ = (id) => document.getElementById(id);
const ui = {
  preview: $("preview"), previewEmpty: $("preview-empty"), badge: $("rec-badge"),
  recTime: $("rec-time"), record: $("record"), stop: $("stop"), afterStop: $("after-stop"),
  upload: $("upload"), progress: $("progress"), fill: $("bar-fill"), text: $("upload-text"),
  message: $("message"), pending: $("pending"), pendingList: $("pending-list"),
  recordings: $("recordings"), noRecordings: $("no-recordings"),
  server: $("server"), serverText: $("server-text"), processing: $("processing"),
  processingFill: $("processing-fill"), processingText: $("processing-text"),
};

// The server's story of an upload, in order; the panel never moves backwards (a status
// refresh may repeat an earlier step after a later event).
const PHASES = ["waiting", "uploading", "saved", "processing", "ready", "failed"];

let recorder = null;
let clock = null;

// --- recording ------------------------------------------------------------------------------

ui.record.addEventListener("click", async () => {
  ui.record.disabled = true;
  showMessage("");
  recorder = new M1Recorder({ serverUrl: SERVER_URL, ...AUTH,
                              uploadWhileRecording: !ui.afterStop.checked });
  resetServerPanel();
  watch(recorder);
  try {
    ui.preview.srcObject = await recorder.openCamera();
    ui.previewEmpty.hidden = true;
    await recorder.start();
  } catch (error) {
    recorder.closeCamera();
    ui.record.disabled = false;
    showMessage(`Could not start recording: ${error.message || error}`, "error");
    return;
  }
  ui.stop.disabled = false;
  ui.afterStop.disabled = true;
  startClock();
});

ui.stop.addEventListener("click", async () => {
  ui.stop.disabled = true;
  stopClock();
  try {
    await recorder.stop();               // resolves once the server has the whole video
  } catch (error) {
    // shown by the "error" listener; the chunks stay in this browser for a later visit
  } finally {
    recorder.closeCamera();
    ui.preview.srcObject = null;
    ui.previewEmpty.hidden = false;
    ui.record.disabled = false;
    ui.afterStop.disabled = false;
  }
});

/** Show an upload's events on the page (a recording, or a resumed pending upload). */
function watch(source) {
  source.addEventListener("state", (event) => { ui.upload.dataset.state = event.detail.state; });
  source.addEventListener("progress", (event) => showProgress(event.detail));
  source.addEventListener("retry", (event) => {
    const { attempt, delayMs, error } = event.detail;
    showMessage(`Cannot reach the server: ${error.message}. Retrying in ` +
                `${(delayMs / 1000).toFixed(1)} s (attempt ${attempt}); nothing is lost, the ` +
                "recording is kept in this browser.", "info");
  });
  source.addEventListener("chunk", () => {
    if (ui.message.classList.contains("info")) showMessage("Connection back. Uploading.");
  });
  source.addEventListener("completed", (event) => {
    const video = event.detail;
    showMessage(`Saved: ${formatBytes(video.size)} in ${video.chunks} chunks, ready to play.`,
                "success");
    remember({ ...video, createdAt: new Date().toISOString() });
    renderRecordings();
  });
  source.addEventListener("warning", (event) => showMessage(event.detail.message, "info"));
  // What the server reports (m1client follows its events, or polls its status).
  source.addEventListener("serverprogress", (event) => showServerProgress(event.detail));
  source.addEventListener("processing", (event) => showProcessing(event.detail));
  source.addEventListener("ready", (event) => showReady(event.detail));
  source.addEventListener("processingfailed", (event) => {
    if (!setPhase("failed")) return;
    ui.processingText.textContent = `Processing failed: ${event.detail.reason}. The original ` +
                                    "recording is saved and plays as it is.";
  });
  source.addEventListener("error", (event) => {
    const error = event.detail.error;
    showMessage(`Upload failed: ${error.message || error}`, "error");
    ui.upload.dataset.state = "failed";
  });
}

function showProgress(p) {
  const sending = p.current ? p.current.loaded : 0;
  const fraction = p.state === "completed" ? 1
    : p.bytesRecorded > 0 ? Math.min(1, (p.bytesAcknowledged + sending) / p.bytesRecorded) : 0;
  const percent = Math.round(fraction * 100);
  ui.fill.style.width = percent + "%";
  ui.progress.setAttribute("aria-valuenow", String(percent));
  Object.assign(ui.upload.dataset, {
    fileId: p.fileId, chunksRecorded: p.chunksRecorded, chunksAcknowledged: p.chunksAcknowledged,
  });
  const recorded = `${formatBytes(p.bytesRecorded)} recorded (${p.chunksRecorded} chunks)`;
  const onServer = `${formatBytes(p.bytesAcknowledged)} on the server ` +
                   `(${p.chunksAcknowledged} chunks)`;
  ui.text.textContent = p.state === "completed"
    ? `Upload complete: ${onServer}.` : `${recorded} · ${onServer} · ${percent}%`;
}

// --- the server's side: bytes it has stored, then processing -----------------------------------

function resetServerPanel() {
  ui.server.hidden = true;
  for (const name of ["phase", "phases", "via", "bytesReceived", "playbackUrl"]) {
    delete ui.server.dataset[name];
  }
  ui.server.dataset.phase = "waiting";
  ui.serverText.textContent = "Saved on server: 0 B";
  showProcessingBar(0);
  ui.processingText.textContent = "Processing starts once the upload is complete.";
}

/** Move the panel to `phase` unless it is already further; data-phases keeps the steps seen
 * (for a reader, and for the browser tests). Returns whether the phase is now `phase`. */
function setPhase(phase) {
  const current = ui.server.dataset.phase || "waiting";
  if (PHASES.indexOf(phase) < PHASES.indexOf(current)) return false;
  if (phase !== current) {
    ui.server.dataset.phase = phase;
    ui.server.dataset.phases = [ui.server.dataset.phases, phase].filter(Boolean).join(" ");
  }
  ui.server.hidden = false;
  return true;
}

function showServerProgress(p) {
  ui.server.dataset.via = p.via;                       // websocket, sse or polling
  const bytes = Math.max(Number(ui.server.dataset.bytesReceived || 0), p.bytesReceived);
  ui.server.dataset.bytesReceived = String(bytes);
  ui.serverText.textContent = `Saved on server: ${formatBytes(bytes)}` +
    (p.state === "completed" ? " (complete)" : "") +
    (p.via === "polling" ? " · checked every 2 s" : " · live");
  setPhase(p.state === "completed" ? "saved" : "uploading");
}

function showProcessing(p) {
  if (!setPhase("processing")) return;
  showProcessingBar(p.progress);
  ui.processingText.textContent = `Processing on the server` +
    (p.stage ? ` (${p.stage})` : "") + `: ${Math.round(p.progress * 100)}%`;
}

function showReady(video) {
  if (!setPhase("ready")) return;
  showProcessingBar(1);
  ui.server.dataset.playbackUrl = video.playbackUrl || "";
  ui.processingText.textContent = video.playbackUrl
    ? "Ready: a seekable copy and a poster were made; the list below plays it."
    : "Ready.";
  if (video.playbackUrl) {
    remember({ fileId: video.fileId, playbackUrl: video.playbackUrl, poster: video.poster });
    renderRecordings();
  }
}

function showProcessingBar(fraction) {
  const percent = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  ui.processingFill.style.width = percent + "%";
  ui.processing.setAttribute("aria-valuenow", String(percent));
}

function showMessage(text, kind) { show(ui.message, text, kind); }

function startClock() {
  const started = Date.now();
  ui.badge.hidden = false;
  ui.recTime.textContent = "0:00";
  clock = setInterval(() => {
    const seconds = Math.floor((Date.now() - started) / 1000);
    ui.recTime.textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
  }, 250);
}

function stopClock() {
  clearInterval(clock);
  ui.badge.hidden = true;
}

// --- uploads left unfinished by an earlier visit ----------------------------------------------

async function offerPending() {
  const pending = await findPendingUploads({ serverUrl: SERVER_URL });
  ui.pendingList.replaceChildren(...pending.map((item) => {
    const li = document.createElement("li");
    li.dataset.fileId = item.fileId;
    const text = document.createElement("span");
    text.textContent = `Recording of ${new Date(item.createdAt).toLocaleString()}: ` +
      `${formatBytes(item.bytesRecorded)}, ${item.chunksPending} of ` +
      `${item.chunksRecorded} chunks not yet uploaded` +
      (item.ended ? "." : " (cut short when the page closed).");
    const finish = button("Finish upload", "finish-pending", async () => {
      finish.disabled = discard.disabled = true;
      showMessage("Finishing the earlier upload…");
      resetServerPanel();
      const upload = await resumePendingUpload(item.fileId, AUTH);
      watch(upload);
      upload.done.then(() => li.remove(), () => { finish.disabled = discard.disabled = false; })
        .finally(() => { ui.pending.hidden = ui.pendingList.children.length === 0; });
    });
    const discard = button("Discard", "discard-pending", async () => {
      await discardPendingUpload(item.fileId);
      li.remove();
      ui.pending.hidden = ui.pendingList.children.length === 0;
    });
    li.append(text, finish, discard);
    return li;
  }));
  ui.pending.hidden = pending.length === 0;
}

// --- the list of recordings -------------------------------------------------------------------
// Recordings made in this browser are remembered in localStorage. If the server lists its
// uploads (GET /api/video), those are shown too.

function remembered() {
  try { return JSON.parse(localStorage.getItem(RECORDINGS_KEY)) || []; } catch { return []; }
}

/** Add what is known of a recording (the upload's result, later its playbackUrl and poster)
 * to what was known before: the two arrive in either order. */
function remember(video) {
  const earlier = remembered().find((v) => v.fileId === video.fileId) || {};
  const list = [{ ...earlier, ...video },
                ...remembered().filter((v) => v.fileId !== video.fileId)];
  localStorage.setItem(RECORDINGS_KEY, JSON.stringify(list.slice(0, MAX_REMEMBERED)));
}

async function serverRecordings() {
  try {
    const response = await fetch(`${SERVER_URL}/api/video?limit=${MAX_REMEMBERED}`);
    if (response.status !== 200) return [];
    const body = await response.json();
    const data = body && body.data;
    const items = Array.isArray(data) ? data : (data && (data.uploads || data.items)) || [];
    return items.filter((v) => v && v.fileId && v.url && v.state !== "uploading" &&
                               v.exists !== false)
      // Play the best derivative when processing made one (a seekable remux, or an MP4 that
      // Safari plays); the download link keeps the original, byte for byte.
      .map((v) => ({ fileId: v.fileId, url: v.url, playbackUrl: v.playbackUrl,
                     poster: v.derivatives && v.derivatives.poster,
                     size: v.fileSize ?? v.size,
                     createdAt: v.createdAt || v.lastModified, mimeType: v.mimeType }));
  } catch {
    return [];                                  // no listing on this server: ours only
  }
}

// One render at a time, in order: a render started later must not be overwritten by an
// earlier one that finishes after it (each fetches the server's listing first).
let rendering = Promise.resolve();

function renderRecordings() {
  rendering = rendering.then(renderRecordingsNow, renderRecordingsNow);
  return rendering;
}

async function renderRecordingsNow() {
  const byId = new Map();
  const known = remembered().filter((v) => v.url);     // a playbackUrl may come before the url
  for (const video of [...await serverRecordings(), ...known]) {  // the server knows more
    if (!byId.has(video.fileId)) byId.set(video.fileId, video);
  }
  const videos = [...byId.values()]
    .sort((a, b) => String(b.createdAt || "").localeCompare(String(a.createdAt || "")));
  ui.recordings.replaceChildren(...videos.map((video) => {
    const li = document.createElement("li");
    li.dataset.fileId = video.fileId;
    const player = document.createElement("video");
    player.controls = true;
    player.preload = "metadata";
    // GET /uploads/..., seekable (Range); a <video> sends no headers: the token rides along
    player.src = video.playbackUrl ? withToken(video.playbackUrl, AUTH.token) : video.url;
    if (video.poster) player.poster = withToken(video.poster, AUTH.token);
    const meta = document.createElement("div");
    meta.className = "meta";
    const when = document.createElement("span");
    when.textContent = [video.createdAt && new Date(video.createdAt).toLocaleString(),
                        video.size !== undefined && formatBytes(video.size)]
      .filter(Boolean).join(" · ");
    const link = document.createElement("a");
    link.href = video.url;
    link.download = video.url.split("/").pop();
    link.textContent = "Download";
    meta.append(when, link);
    li.append(player, meta);
    return li;
  }));
  ui.noRecordings.hidden = videos.length > 0;
}

ui.record.disabled = false;                 // the page works from here on
renderRecordings();
offerPending().catch((error) => console.warn("could not look for pending uploads", error));
