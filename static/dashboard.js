// The dashboard at GET /dashboard: the uploads (GET /api/video, page by page), live progress of
// those in progress (the event stream, m1client.js watchUpload), play, download, delete, and the
// webhook deliveries with retry (GET /api/video/webhooks/deliveries, POST .../:id/retry).
//
// Auth: every route it calls needs the API key when the server has one. The page asks for it
// once and keeps it in sessionStorage (this tab only, gone when the tab closes); it is sent as
// Authorization: Bearer. A <video>, an <img> and an event stream cannot send that header, so
// for those the page mints a short read token per upload (POST /api/video/tokens) and puts it
// in the URL; the key itself never goes into a URL. Without the key the page shows nothing:
// the API refuses it.
import { watchUpload, withToken } from "/m1client.js";
import { button, formatBytes, showMessage as show } from "/ui.js";

const KEY_STORAGE = "m1dashboard.apiKey";
// Uploads per page: 20, or /dashboard?limit=N (1..500, the listing's own bounds).
const PAGE_SIZE = Math.min(500, Math.max(1, Number(
  new URLSearchParams(location.search).get("limit")) || 20));
const DELIVERY_PAGE_SIZE = 20;
const MAX_WATCHED = 20;               // event streams open at once (the server caps them too)
const TOKEN_LIFETIME_S = 3600;
const RETRY_REFRESH_MS = 2000;        // after a retry, the deliveries are listed again
const TOKEN_RENEW_MS = (TOKEN_LIFETIME_S - 300) * 1000;

const $ = (id) => document.getElementById(id);
const ui = {
  login: $("login"), key: $("api-key"), loginError: $("login-error"), logout: $("logout"),
  uploadsCard: $("uploads-card"), rows: $("upload-rows"), none: $("no-uploads"),
  moreUploads: $("more-uploads"), refresh: $("refresh"), playerPanel: $("player-panel"),
  player: $("player"), playerTitle: $("player-title"), webhooksCard: $("webhooks-card"),
  webhooksOff: $("webhooks-off"), deliveries: $("delivery-rows"),
  moreDeliveries: $("more-deliveries"), message: $("message"),
};

let authOn = false;                   // the server answered 401 without a key
const tokens = new Map();             // fileId -> Promise of { token, at } (auth on only)
const watching = new Map();           // fileId -> stop() of its event stream

// --- talking to the API -------------------------------------------------------------------------

function apiKey() { return sessionStorage.getItem(KEY_STORAGE); }

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error && body.error.code;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (apiKey()) headers.Authorization = "Bearer " + apiKey();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const reply = await response.json().catch(() => null);
  if (!response.ok || !reply || !reply.success) throw new ApiError(response.status, reply);
  return reply.data;
}

/** A read token for one upload (minted with the key, kept in memory), or null when auth is
 * off: for the URLs of a <video>, an <img>, a link and an event stream. */
async function readToken(fileId) {
  if (!authOn) return null;
  let entry = tokens.get(fileId);
  if (!entry || Date.now() - (await entry).at > TOKEN_RENEW_MS) {
    entry = api("POST", "/api/video/tokens", { fileId, rights: ["read"],
                                               expiresIn: TOKEN_LIFETIME_S })
      .then((data) => ({ token: data.token, at: Date.now() }));
    tokens.set(fileId, entry);
    entry.catch(() => tokens.delete(fileId));
  }
  return (await entry).token;
}

async function mediaUrl(fileId, url) {
  return withToken(url, await readToken(fileId));
}

// --- signing in ---------------------------------------------------------------------------

ui.login.addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, ui.key.value.trim());
  ui.key.value = "";
  await start();
});

ui.logout.addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  location.reload();
});

/** Show the login form (and nothing else) when the API refuses us. */
function refused(error) {
  authOn = true;
  stopWatching();
  ui.uploadsCard.hidden = ui.webhooksCard.hidden = true;
  ui.rows.replaceChildren();
  ui.deliveries.replaceChildren();
  ui.login.hidden = false;
  ui.loginError.hidden = !apiKey();
  ui.loginError.textContent = apiKey() ? `The server refused this key: ${error.message}` : "";
  if (apiKey()) sessionStorage.removeItem(KEY_STORAGE);
  ui.key.focus();
}

async function start() {
  try {
    await loadUploads(null);
  } catch (error) {
    if (error.status === 401 || error.status === 403) return refused(error);
    return showMessage(`Cannot list the uploads: ${error.message}`, "error");
  }
  authOn = authOn || Boolean(apiKey());
  ui.login.hidden = true;
  ui.logout.hidden = !apiKey();
  ui.uploadsCard.hidden = false;
  loadDeliveries(null).catch((error) => showMessage(`Webhook deliveries: ${error.message}`,
                                                    "error"));
}

// --- the uploads ----------------------------------------------------------------------------

let uploadsCursor = null;

async function loadUploads(cursor) {
  const query = `limit=${PAGE_SIZE}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "");
  const data = await api("GET", `/api/video?${query}`);
  if (!cursor) {
    stopWatching();
    ui.rows.replaceChildren();
  }
  for (const upload of data.uploads) ui.rows.append(uploadRow(upload));
  uploadsCursor = data.nextCursor;
  ui.moreUploads.hidden = !uploadsCursor;
  ui.none.hidden = ui.rows.children.length > 0;
}

ui.moreUploads.addEventListener("click", () => loadUploads(uploadsCursor).catch(failed));
ui.refresh.addEventListener("click", () => {
  loadUploads(null).catch(failed);
  loadDeliveries(null).catch(failed);
});

function uploadRow(upload) {
  const row = document.createElement("tr");
  row.dataset.fileId = upload.fileId;
  const poster = document.createElement("img");
  poster.className = "poster";
  poster.alt = "";
  const id = cell(upload.fileId, "file-id");
  const created = document.createElement("small");
  created.textContent = upload.createdAt ? new Date(upload.createdAt).toLocaleString() : "";
  id.append(document.createElement("br"), created);
  const actions = document.createElement("td");
  actions.className = "actions";
  row.append(cell(poster), id, cell("", "state"), cell("", "size"), cell("", "duration"),
             cell("", "processing"), actions);
  showUpload(row, upload);
  if (upload.state === "uploading") follow(row, upload.fileId);
  return row;
}

/** Fill a row from a status (the listing's entry, or a `state` event). */
function showUpload(row, upload) {
  row.dataset.state = upload.state;
  row.querySelector(".state").textContent = upload.state;
  showSize(row, upload.fileSize, upload.nextChunkIndex);
  const video = upload.video || {};
  row.querySelector(".duration").textContent =
    video.durationSeconds ? formatDuration(video.durationSeconds) : "";
  showProcessing(row, upload.processing);
  const poster = upload.derivatives && upload.derivatives.poster;
  const img = row.querySelector(".poster");
  if (poster && !img.dataset.src) {
    img.dataset.src = poster;
    mediaUrl(upload.fileId, poster).then((url) => { img.src = url; }, () => {});
  }
  renderActions(row, upload);
}

function showSize(row, bytes, chunks) {
  const most = Math.max(Number(row.dataset.bytes || 0), bytes || 0);
  row.dataset.bytes = String(most);
  row.querySelector(".size").textContent = formatBytes(most) +
    (row.dataset.state === "uploading" && chunks !== undefined ? ` · ${chunks} chunks` : "");
}

function showProcessing(row, processing) {
  const target = row.querySelector(".processing");
  target.replaceChildren();
  if (!processing) return;
  row.dataset.processing = processing.state;
  const text = processing.state === "running"
    ? `running ${Math.round((processing.progress || 0) * 100)}%` : processing.state;
  target.append(text);
  if (processing.error) {
    const error = document.createElement("div");
    error.className = "error-text";
    error.textContent = processing.error;
    target.append(error);
  }
}

function renderActions(row, upload) {
  const actions = row.querySelector(".actions");
  actions.replaceChildren();
  if (upload.state === "uploading") {
    const watch = document.createElement("a");
    watch.className = "button small watch";
    watch.textContent = "Watch live";
    watch.target = "_blank";
    watch.href = `/watch/${encodeURIComponent(upload.fileId)}`;
    if (authOn) {
      mediaUrl(upload.fileId, watch.href).then((url) => { watch.href = url; }, () => {});
    }
    actions.append(watch);
  } else {
    actions.append(button("Play", "play", () => play(upload).catch(failed)));
    const download = document.createElement("a");
    download.className = "button small download";
    download.textContent = "Download";
    download.download = upload.url.split("/").pop();
    download.href = upload.url;
    mediaUrl(upload.fileId, upload.url).then((url) => { download.href = url; }, () => {});
    actions.append(download);
  }
  actions.append(button("Delete", "delete", () => confirmDelete(row, upload.fileId)));
}

/** Follow an upload in progress: its row shows the bytes as they arrive. */
async function follow(row, fileId) {
  if (watching.has(fileId) || watching.size >= MAX_WATCHED) return;
  watching.set(fileId, () => {});
  const token = await readToken(fileId);
  if (!watching.has(fileId)) return;                   // stopped meanwhile
  const stop = watchUpload("", fileId, (event) => {
    if (event.type === "state" && event.status && event.status.exists) {
      showUpload(row, event.status);
    } else if (event.type === "chunk") {
      showSize(row, event.bytesReceived, event.nextChunkIndex);
    } else if (event.type === "completed") {
      row.dataset.state = "completed";
      row.querySelector(".state").textContent = "completed";
      showSize(row, event.size);
      refreshRow(row, fileId);
    } else if (event.type === "processing") {
      showProcessing(row, { state: "running", progress: event.progress });
    } else if (event.type === "ready" || event.type === "failed") {
      refreshRow(row, fileId);
    } else if (event.type === "deleted") {
      row.remove();
    }
  }, { token, headers: apiKey() ? { Authorization: "Bearer " + apiKey() } : {} });
  watching.set(fileId, stop);
}

function refreshRow(row, fileId) {
  api("GET", `/api/video/status/${encodeURIComponent(fileId)}`)
    .then((status) => { if (status.exists) showUpload(row, status); }, () => {});
}

function stopWatching() {
  for (const stop of watching.values()) stop();
  watching.clear();
}

async function play(upload) {
  ui.playerPanel.hidden = false;
  ui.playerTitle.textContent = upload.fileId;
  ui.player.dataset.fileId = upload.fileId;
  ui.player.src = await mediaUrl(upload.fileId, upload.playbackUrl || upload.url);
  ui.player.play().catch(() => {});
  ui.playerPanel.scrollIntoView({ block: "nearest" });
}

/** Delete asks first, in the row itself: "Delete upload_…? Yes / No". */
function confirmDelete(row, fileId) {
  const actions = row.querySelector(".actions");
  const kept = [...actions.childNodes];
  const question = document.createElement("span");
  question.className = "confirm";
  question.textContent = `Delete ${fileId}? `;
  const restore = () => actions.replaceChildren(...kept);
  question.append(
    button("Yes, delete", "confirm-delete", async () => {
      try {
        await api("DELETE", `/api/video/${encodeURIComponent(fileId)}`);
        const stop = watching.get(fileId);
        if (stop) stop();
        watching.delete(fileId);
        row.remove();
        ui.none.hidden = ui.rows.children.length > 0;
        if (ui.player.dataset.fileId === fileId) {
          ui.player.removeAttribute("src");
          ui.playerPanel.hidden = true;
        }
        showMessage(`Deleted ${fileId}.`, "success");
      } catch (error) {
        restore();
        failed(error);
      }
    }),
    button("No", "cancel-delete", restore));
  actions.replaceChildren(question);
}

// --- webhook deliveries ---------------------------------------------------------------------

let deliveriesCursor = null;

async function loadDeliveries(cursor) {
  const query = `limit=${DELIVERY_PAGE_SIZE}` +
    (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "");
  const data = await api("GET", `/api/video/webhooks/deliveries?${query}`);
  ui.webhooksCard.hidden = false;
  ui.webhooksOff.hidden = data.enabled || data.deliveries.length > 0;
  if (!cursor) ui.deliveries.replaceChildren();
  for (const delivery of data.deliveries) ui.deliveries.append(deliveryRow(delivery));
  deliveriesCursor = data.nextCursor;
  ui.moreDeliveries.hidden = !deliveriesCursor;
}

ui.moreDeliveries.addEventListener("click", () => loadDeliveries(deliveriesCursor)
  .catch(failed));

function deliveryRow(delivery) {
  const row = document.createElement("tr");
  row.dataset.deliveryId = String(delivery.id);
  row.dataset.state = delivery.state;
  row.dataset.attempts = String(delivery.attempts);
  const answer = delivery.lastStatus ? `HTTP ${delivery.lastStatus}` : delivery.lastError || "";
  const when = delivery.lastAttemptAt || delivery.createdAt;
  const actions = document.createElement("td");
  if (delivery.state === "failed") {
    actions.append(button("Retry", "retry", async () => {
      try {
        const again = await api("POST", `/api/video/webhooks/deliveries/${delivery.id}/retry`);
        row.replaceWith(deliveryRow(again));
        // The new attempt runs in the background: show how it went a moment later.
        setTimeout(() => loadDeliveries(null).catch(failed), RETRY_REFRESH_MS);
      } catch (error) {
        failed(error);
      }
    }));
  }
  row.append(cell(delivery.type), cell(delivery.fileId || ""), cell(delivery.state, "state"),
             cell(String(delivery.attempts)), cell(answer, "answer"),
             cell(when ? new Date(when).toLocaleString() : ""), actions);
  return row;
}

// --- helpers ------------------------------------------------------------------------------

function cell(content, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.append(content);
  return td;
}

function showMessage(text, kind) { show(ui.message, text, kind); }

function failed(error) {
  if (error.status === 401) return refused(error);
  showMessage(error.message || String(error), "error");
}

function formatDuration(seconds) {
  const s = Math.round(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

start();
