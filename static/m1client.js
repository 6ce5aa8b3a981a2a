/**
 * m1client.js: record video in the browser and upload it to m1server *while* it records.
 *
 * One dependency-free ES module (no build step). m1server serves it at GET /m1client.js:
 *
 *   import { M1Recorder } from "http://localhost:3001/m1client.js";
 *
 *   const recorder = new M1Recorder({ serverUrl: "http://localhost:3001" });
 *   recorder.addEventListener("progress", (e) => console.log(e.detail.bytesAcknowledged));
 *   preview.srcObject = await recorder.openCamera();
 *   await recorder.start();
 *   // ... later
 *   const video = await recorder.stop();     // { fileId, url, size, mimeType, chunks }
 *
 * How it works, in the order the bytes travel:
 *   1. getUserMedia gives a camera+microphone stream; MediaRecorder encodes it and hands us a
 *      Blob every `timeslice` ms (1 s by default).
 *   2. Each Blob becomes chunk 0, 1, 2, ... It is first written to IndexedDB (the "stash"), so a
 *      page reload or a tab crash loses nothing, and then POSTed to /api/video/upload with the
 *      seed's multipart fields (fileId, chunkIndex, status, mimeType, file).
 *   3. Chunks are sent one at a time, in order. When the server acknowledges a chunk (200 after
 *      fsync) it is deleted from the stash. So when the user presses stop, everything but the
 *      last second is already on the server, and finishing is one small request.
 *   4. The last chunk is sent with status=completed. Which chunk is last is only known when
 *      MediaRecorder fires "stop", so after stop() is called no chunk leaves until then.
 *   5. A failed request is retried with exponential backoff and jitter. Before each retry the
 *      client asks GET /api/video/status/:fileId where the server stands and resumes from its
 *      `nextChunkIndex`: after a network drop or a server restart, it neither skips a chunk
 *      the server never stored nor depends on an answer it never got.
 *   6. On the next page load, findPendingUploads() lists uploads whose chunks are still in the
 *      stash, and resumePendingUpload() finishes them.
 *
 * Events (each also available as a callback option: onProgress, onChunk, ...):
 *   progress   detail: { fileId, state, chunksRecorded, bytesRecorded, chunksAcknowledged,
 *                        bytesAcknowledged, current: { index, loaded, total } | null }
 *   chunk      a chunk was acknowledged: { index, size, duplicate, nextChunkIndex }
 *   retry      a request failed and will be retried: { attempt, delayMs, error }
 *   state      the upload's state changed: { state }  (uploading, retrying, completed, ...)
 *   completed  the server has the whole video: { fileId, url, size, mimeType, chunks }
 *   error      the upload gave up: { error }  (an M1UploadError; the chunks stay stashed)
 *   warning    IndexedDB refused a chunk; uploading goes on from memory: { error, message }
 *   start, stop  (M1Recorder only) recording started / MediaRecorder stopped
 *
 * What the *server* reports (from its real-time events, see watchUpload() below; off with
 * watchServer: false):
 *   serverprogress  bytes the server has durably stored: { fileId, state, bytesReceived,
 *                   chunksReceived, via }  (state: "uploading" or "completed";
 *                   via: "websocket", "sse" or "polling")
 *   processing      the server is processing the video: { fileId, progress (0..1), stage }
 *   ready           processing is done: { fileId, playbackUrl, poster, derivatives, video }
 *   processingfailed  processing failed: { fileId, reason }  (the original is still playable)
 */

export const VERSION = "0.1.0";

// ------------------------------------------------------------------------------------------
// Settings
// ------------------------------------------------------------------------------------------

export const DEFAULT_TIMESLICE_MS = 1000;      // one chunk a second, as the seed did
export const DEFAULT_REQUEST_TIMEOUT_MS = 30000;
export const DEFAULT_RETRY = {
  baseDelayMs: 500,        // first retry after 0.25-0.5 s
  maxDelayMs: 10000,       // never wait more than 10 s between tries
  maxAttempts: Infinity,   // keep trying while the page is open: the chunks are safe meanwhile
};

// What to record, best first. Chrome and Firefox record WebM (VP9 or VP8 video, Opus audio);
// Safari records MP4 (H.264 + AAC). The first type the browser supports wins.
export const MIME_TYPE_PREFERENCES = [
  "video/webm;codecs=vp9,opus",
  "video/webm;codecs=vp8,opus",
  "video/webm",
  "video/mp4;codecs=avc1,mp4a",
  "video/mp4",
];

// Answers worth retrying: the server is busy, restarting, out of disk for now, or the request
// never got an answer (status 0: network error or timeout). Anything else (400, 409, 413, 415)
// would fail again the same way.
const RETRYABLE_STATUSES = new Set([0, 408, 429, 500, 502, 503, 504, 507]);

const DB_NAME = "m1client";
const DB_VERSION = 1;
const LOCK_PREFIX = "m1client-upload:";        // Web Locks: which tab is sending an upload
const LOCK_WAIT_MS = 1000;       // how long to wait for a lock a reloaded page still holds
export const STATUS_POLL_INTERVAL_MS = 2000;   // watchUpload without events: status this often
const EVENTS_RECONNECT_MS = 1000;  // a dropped WebSocket is reopened after this long
const SERVER_EVENT_TYPES = ["serverprogress", "processing", "ready", "processingfailed"];

// ------------------------------------------------------------------------------------------
// Public helpers
// ------------------------------------------------------------------------------------------

/** The first of `preferences` this browser's MediaRecorder can record, or "" to let it pick. */
export function pickMimeType(preferences = MIME_TYPE_PREFERENCES) {
  if (typeof MediaRecorder === "undefined" || !MediaRecorder.isTypeSupported) return "";
  return preferences.find((type) => MediaRecorder.isTypeSupported(type)) || "";
}

/** A fresh upload id in the seed's format: upload_<milliseconds>_<random>. */
export function newFileId() {
  const random = Math.random().toString(36).slice(2, 11).padEnd(9, "0");
  return `upload_${Date.now()}_${random}`;
}

/** What went wrong with a request: HTTP status (0 = no answer), the server's error code. */
export class M1UploadError extends Error {
  constructor(message, { status = 0, code = "network_error", retryAfterMs = 0 } = {}) {
    super(message);
    this.name = "M1UploadError";
    this.status = status;
    this.code = code;
    this.retryAfterMs = retryAfterMs;
    this.retryable = RETRYABLE_STATUSES.has(status);
  }
}

// ------------------------------------------------------------------------------------------
// M1Recorder: camera -> MediaRecorder -> M1Upload
// ------------------------------------------------------------------------------------------

export class M1Recorder extends EventTarget {
  /**
   * options: serverUrl ("" = this page's server), timeslice (ms per chunk), mimeType (default:
   * pickMimeType()), uploadWhileRecording (true; false uploads everything after stop, as the
   * seed did), constraints (for getUserMedia), stream (record this instead of the camera),
   * fileId, retry ({ baseDelayMs, maxDelayMs, maxAttempts }), requestTimeoutMs, headers (e.g.
   * { Authorization: "Bearer ..." }), videoBitsPerSecond, audioBitsPerSecond, watchServer
   * (true: follow the server's events, see watchUpload), and callbacks onProgress, onChunk,
   * onRetry, onState, onCompleted, onError, onWarning, onStart, onStop, onServerprogress,
   * onProcessing, onReady, onProcessingfailed.
   */
  constructor(options = {}) {
    super();
    this.options = {
      serverUrl: "",
      timeslice: DEFAULT_TIMESLICE_MS,
      uploadWhileRecording: true,
      constraints: { video: true, audio: true },
      ...options,
    };
    this.stream = options.stream || null;
    this.mediaRecorder = null;
    this.upload = null;            // the M1Upload of the current (or last) recording
    addCallbacks(this, options);
  }

  get fileId() { return this.upload ? this.upload.fileId : null; }
  get recording() { return !!this.mediaRecorder && this.mediaRecorder.state !== "inactive"; }

  /** Ask for the camera and microphone; returns the stream (show it in a <video> preview). */
  async openCamera(constraints = this.options.constraints) {
    if (!this.stream) {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("this browser cannot record (no getUserMedia; is the page served " +
                        "over https or from localhost?)");
      }
      this.stream = await navigator.mediaDevices.getUserMedia(constraints);
    }
    return this.stream;
  }

  /** Stop the camera (the light goes off). */
  closeCamera() {
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
    this.stream = null;
  }

  /** Start recording; chunks start flowing to the server at once. Returns the M1Upload. */
  async start() {
    if (this.recording) throw new Error("already recording");
    const stream = await this.openCamera();
    const mimeType = this.options.mimeType !== undefined ? this.options.mimeType
                                                         : pickMimeType();
    const recorderOptions = {};
    if (mimeType) recorderOptions.mimeType = mimeType;
    if (mimeType.startsWith("video/mp4")) {
      // Chrome's MP4 writer holds every frame until stop() unless told to cut fragments.
      recorderOptions.videoKeyFrameIntervalDuration = this.options.timeslice;
    }
    for (const name of ["videoBitsPerSecond", "audioBitsPerSecond"]) {
      if (this.options[name]) recorderOptions[name] = this.options[name];
    }
    const mediaRecorder = new MediaRecorder(stream, recorderOptions);
    const { serverUrl, fileId, uploadWhileRecording, retry, requestTimeoutMs, headers,
            checksum, watchServer, token } = this.options;
    const upload = new M1Upload({ serverUrl, fileId, mimeType, uploadWhileRecording, retry,
                                  requestTimeoutMs, headers, checksum, watchServer,
                                  token });
    for (const type of ["progress", "chunk", "retry", "state", "completed", "error",
                        "warning", ...SERVER_EVENT_TYPES]) {
      upload.addEventListener(type, (event) => this.emit(type, event.detail));
    }
    await upload.open();

    // MediaRecorder sometimes hands over empty Blobs; they carry nothing worth a request.
    mediaRecorder.addEventListener("dataavailable", (event) => {
      if (event.data && event.data.size > 0) upload.add(event.data);
    });
    // "stop" comes after the last "dataavailable": only now is the last chunk known.
    mediaRecorder.addEventListener("stop", () => {
      if (upload.state !== "cancelled") upload.finish();
      this.emit("stop", { fileId: upload.fileId });
    });
    mediaRecorder.addEventListener("error", (event) => {
      this.emit("error", { error: event.error || new Error("MediaRecorder failed") });
    });

    mediaRecorder.start(this.options.timeslice);
    upload.mimeType = mediaRecorder.mimeType || mimeType;   // known only after start()
    this.mediaRecorder = mediaRecorder;
    this.upload = upload;
    upload.start();
    this.emit("start", { fileId: upload.fileId, mimeType: upload.mimeType });
    return upload;
  }

  /** Stop recording; resolves with { fileId, url, size, mimeType, chunks } once the server
   * has the whole video (or rejects with an M1UploadError if the upload gives up). */
  stop() {
    if (!this.upload) return Promise.reject(new Error("not recording"));
    if (this.recording) {
      this.upload.hold();           // the last chunk is not known until "stop" fires
      this.mediaRecorder.stop();
    }
    return this.upload.done;
  }

  /** Stop recording and throw the recording away (on the server it stays unfinished). */
  async cancel() {
    if (!this.upload) return;
    this.upload.cancel();
    if (this.recording) this.mediaRecorder.stop();
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

// ------------------------------------------------------------------------------------------
// M1Upload: numbered chunks -> stash -> server, in order, retried, resumable
// ------------------------------------------------------------------------------------------

export class M1Upload extends EventTarget {
  /** options: serverUrl, fileId, mimeType, uploadWhileRecording, retry, requestTimeoutMs,
   * headers, token (a server with --api-key: a token from your backend's
   * POST /api/video/tokens, sent as Authorization: Bearer and as ?token= on the result's
   * media URL, which a <video> element fetches without headers), checksum (send each chunk's sha256; default true where crypto.subtle exists),
   * watchServer (default true: follow the server's events from start(), see watchUpload),
   * and callbacks onProgress, onChunk, onRetry, onState, onCompleted, onError,
   * onServerprogress, onProcessing, onReady, onProcessingfailed. */
  constructor(options = {}) {
    super();
    this.serverUrl = String(options.serverUrl || "").replace(/\/+$/, "");
    this.fileId = options.fileId || newFileId();
    this.mimeType = options.mimeType || "";
    this.retry = { ...DEFAULT_RETRY, ...(options.retry || {}) };
    this.requestTimeoutMs = options.requestTimeoutMs || DEFAULT_REQUEST_TIMEOUT_MS;
    this.headers = { ...(options.headers || {}) };
    this.token = options.token || null;
    if (this.token) this.headers.Authorization = `Bearer ${this.token}`;
    this.checksum = options.checksum !== undefined ? options.checksum
      : typeof crypto !== "undefined" && !!crypto.subtle;
    this.state = "idle";
    this.result = null;
    this.watchServer = options.watchServer !== false;
    this._stopWatching = null;     // ends the server watch (see _watchServer)

    this._queue = [];              // chunks not yet acknowledged, by index: { index, blob, stored }
    this._nextIndex = 0;           // the index the next recorded chunk gets
    this._lastIndex = null;        // known once the recording has ended
    this._sentHighest = -1;        // highest index whose request has left (maybe unanswered)
    this._holding = options.uploadWhileRecording === false;   // the seed's way: all after stop
    this._resync = false;          // ask the server where it stands before the next send
    this._createdAt = new Date().toISOString();
    this._bytesRecorded = 0;
    this._bytesAcknowledged = 0;
    this._current = null;          // { index, loaded, total } of the request in flight
    this._xhr = null;
    this._wakeUp = null;
    this._stash = null;
    this.done = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.done.catch(() => {});     // callers may listen to events only
    if (options._resume) this._restore(options._resume);
    addCallbacks(this, options);
  }

  /** Open the stash (IndexedDB, or memory where there is none). */
  async open() {
    if (!this._stash) this._stash = await openStash();
    return this;
  }

  get persistent() { return !!this._stash && this._stash.persistent; }

  /** Take the next recorded Blob as the next chunk: stash it, then let the sender have it. */
  add(blob) {
    if (this._lastIndex !== null) throw new Error("the recording has already ended");
    const chunk = { index: this._nextIndex++, blob, size: blob.size };
    this._bytesRecorded += blob.size;
    chunk.stored = this._stash.putChunk(this._record(), chunk.index, blob)
      .catch((error) => this._stashFailed(error));
    this._queue.push(chunk);
    this._progress();
    this._wake();
    return chunk.index;
  }

  /** Begin sending (call once). The web lock tells other tabs this upload is alive. */
  start() {
    if (this.state !== "idle") return this.done;
    if (typeof navigator !== "undefined" && navigator.locks) {
      navigator.locks.request(LOCK_PREFIX + this.fileId, () => this.done.catch(() => {}))
        .catch(() => {});
    }
    this._setState("uploading");
    // Before chunk 0 leaves, so that its event is not missed (docs/events.md).
    if (this.watchServer) this._watchServer();
    this._run();
    return this.done;
  }

  /** No chunk leaves until finish() says which one is last (called when stop() is pressed). */
  hold() {
    this._holding = true;
  }

  /** The recording has ended: the newest chunk is the last one. Returns `done`. */
  finish() {
    if (this._lastIndex !== null || this._isOver()) return this.done;
    if (this._nextIndex === 0) {
      this._fail(new M1UploadError("nothing was recorded", { code: "empty_recording" }));
      return this.done;
    }
    if (this._nextIndex - 1 <= this._sentHighest) {
      // The newest chunk already left as an ordinary one (the recorder stopped on its own, or
      // this upload was restored after a reload): close the upload with an empty last chunk.
      this.add(new Blob([], { type: this.mimeType }));
    }
    this._lastIndex = this._nextIndex - 1;
    const last = this._queue[this._queue.length - 1];
    // Persist "recording ended" before the last chunk may leave, so a reload never takes the
    // last chunk for an ordinary one and sends a second "last" chunk after it.
    last.stored = last.stored.then(() => this._stash.saveUpload(this._record()))
      .catch((error) => this._stashFailed(error));
    this._wake();
    return this.done;
  }

  /** Stop sending and forget the stashed chunks. */
  cancel() {
    if (this._isOver()) return;
    this._setState("cancelled");
    this._unwatchServer();
    if (this._xhr) this._xhr.abort();
    if (this._stash) this._stash.forget(this.fileId).catch(() => {});
    this._reject(new M1UploadError("upload cancelled", { code: "cancelled", status: -1 }));
    this._wake();
  }

  /** Where the upload stands (the detail of every "progress" event). */
  get progress() {
    return {
      fileId: this.fileId,
      state: this.state,
      chunksRecorded: this._nextIndex,
      bytesRecorded: this._bytesRecorded,
      chunksAcknowledged: this._nextIndex - this._queue.length,
      bytesAcknowledged: this._bytesAcknowledged,
      current: this._current,
    };
  }

  // -- the sender: one loop, one request at a time, in index order ------------------------

  async _run() {
    let attempt = 0;
    while (!this._isOver()) {
      const chunk = this._queue[0];
      if (!chunk || (this._holding && this._lastIndex === null)) {
        await this._sleep(Infinity);             // until a chunk arrives or finish()
        continue;
      }
      try {
        if (this._resync) {
          await this._resyncWithServer();
          this._resync = false;
          continue;
        }
        await chunk.stored;
        const isLast = chunk.index === this._lastIndex;
        this._sentHighest = Math.max(this._sentHighest, chunk.index);
        const reply = await this._send(chunk, isLast);
        attempt = 0;
        this._acknowledge(chunk, reply);
        if (isLast) {
          if (reply.status !== "completed") {
            throw new M1UploadError(`the server still misses chunks ${reply.missingChunks}`,
                                    { status: 409, code: "incomplete_upload" });
          }
          await this._complete();
        }
      } catch (error) {
        if (this._isOver()) return;
        const failure = error instanceof M1UploadError ? error
          : new M1UploadError(String(error && error.message || error), { status: -1,
                                                                       code: "client_error" });
        attempt += 1;
        if (!failure.retryable || attempt > this.retry.maxAttempts) {
          this._fail(failure);
          return;
        }
        // After a failure we cannot know whether the server stored the chunk (the answer may
        // be what got lost), so the next step is to ask it.
        this._resync = true;
        const delayMs = Math.max(backoffDelay(attempt, this.retry), failure.retryAfterMs);
        this._current = null;
        this._setState("retrying");
        this.emit("retry", { attempt, delayMs, error: failure });
        await this._sleep(delayMs, true);
        if (!this._isOver()) this._setState("uploading");
      }
    }
  }

  async _send(chunk, isLast) {
    const fields = {
      fileId: this.fileId,
      chunkIndex: String(chunk.index),
      status: isLast ? "completed" : "uploading",
    };
    if (this.mimeType) fields.mimeType = this.mimeType;
    if (this.checksum) fields.checksum = "sha256:" + await sha256Hex(chunk.blob);
    this._current = { index: chunk.index, loaded: 0, total: chunk.size };
    this._progress();
    return postChunk(this.serverUrl + "/api/video/upload", fields, chunk.blob, {
      headers: this.headers,
      timeoutMs: this.requestTimeoutMs,
      started: (xhr) => { this._xhr = xhr; },
      onProgress: (fraction) => {
        this._current = { index: chunk.index, loaded: Math.round(fraction * chunk.size),
                          total: chunk.size };
        this._progress();
      },
    });
  }

  /** The server has chunk.index (the 200 comes after fsync): drop it from queue and stash. */
  _acknowledge(chunk, reply) {
    this._xhr = null;
    this._current = null;
    this._dropThrough(chunk.index);
    this.emit("chunk", { index: chunk.index, size: chunk.size, duplicate: !!reply.duplicate,
                         nextChunkIndex: reply.nextChunkIndex });
    this._progress();
  }

  /** After a failure: GET the status and continue from the server's nextChunkIndex. */
  async _resyncWithServer() {
    const status = await getStatus(this.serverUrl, this.fileId, this.headers,
                                   this.requestTimeoutMs);
    const first = this._queue.length ? this._queue[0].index : this._nextIndex;
    if (!status.exists) {
      if (first === 0) return;                    // nothing acknowledged yet: start from 0
      throw new M1UploadError(`the server has no upload ${this.fileId} any more; chunks ` +
                              `0-${first - 1} it acknowledged are gone`,
                              { status: 404, code: "upload_lost" });
    }
    const next = status.nextChunkIndex;
    if (next < first) {
      throw new M1UploadError(`the server lost chunks ${next}-${first - 1} it had ` +
                              "acknowledged", { status: 409, code: "upload_lost" });
    }
    this._dropThrough(next - 1);
    this._progress();
    if (status.state === "completed") await this._complete(status);
  }

  _dropThrough(index) {
    while (this._queue.length && this._queue[0].index <= index) {
      const chunk = this._queue.shift();
      this._bytesAcknowledged += chunk.size;
      // Deleting only after the 200: a crash between the two re-sends a duplicate, which the
      // server acknowledges again without storing it twice.
      this._stash.deleteChunk(this.fileId, chunk.index).catch(() => {});
    }
  }

  async _complete(status) {
    if (this._isOver()) return;
    if (!status) {
      // The last 200 already said "completed"; the status adds where to play it.
      status = await getStatus(this.serverUrl, this.fileId, this.headers,
                               this.requestTimeoutMs).catch(() => ({}));
    }
    const extension = /^video\/mp4|^audio\/mp4/.test(this.mimeType) ? "mp4" : "webm";
    const path = status.url || `/uploads/${this.fileId}.${extension}`;
    this.result = {
      fileId: this.fileId,
      url: withToken(/^https?:/.test(path) ? path : this.serverUrl + path, this.token),
      size: status.fileSize !== undefined ? status.fileSize : this._bytesAcknowledged,
      mimeType: status.mimeType || this.mimeType,
      chunks: status.totalChunks || (this._lastIndex === null ? null : this._lastIndex + 1),
    };
    this._bytesAcknowledged = this._bytesRecorded;
    this._setState("completed");
    this._progress();
    await this._stash.forget(this.fileId).catch(() => {});
    this.emit("completed", this.result);
    this._resolve(this.result);
    this._wake();
  }

  /** IndexedDB refused a write (quota, private mode): keep uploading from memory, but say
   * that a reload would now lose chunks. */
  _stashFailed(error) {
    this.emit("warning", { error, message: "could not keep a chunk in IndexedDB; a reload " +
                                           "before the upload finishes would lose it" });
  }

  _fail(error) {
    if (this._isOver()) return;
    this._setState("failed");      // the chunks stay stashed: findPendingUploads() offers them
    this._unwatchServer();
    this.emit("error", { error });
    this._reject(error);
    this._wake();
  }

  // -- what the server reports (watchUpload -> serverprogress, processing, ready) -----------

  _watchServer() {
    const emitServer = (fields) => this.emit("serverprogress", { fileId: this.fileId, ...fields });
    this._stopWatching = watchUpload(this.serverUrl, this.fileId, (event, via) => {
      switch (event.type) {
        case "state":       // a full refresh: the same shape as GET /api/video/status
          for (const [type, detail] of clientEventsFromStatus(this.serverUrl, event.status)) {
            this.emit(type, { fileId: this.fileId, ...detail, via });
          }
          break;
        case "chunk":       // bytesReceived: stored and fsynced, not merely sent
          emitServer({ state: "uploading", bytesReceived: event.bytesReceived,
                       chunksReceived: event.nextChunkIndex, via });
          break;
        case "completed":
          emitServer({ state: "completed", bytesReceived: event.size, via });
          break;
        case "processing":
          this.emit("processing", { fileId: this.fileId, progress: event.progress,
                                    stage: event.stage || null });
          break;
        case "ready":
          this.emit("ready", readyDetail(this.serverUrl, this.fileId, event));
          break;
        case "failed":
          this.emit("processingfailed", { fileId: this.fileId, reason: event.reason });
          break;
      }
    }, { headers: this.headers, token: this.token });
  }

  _unwatchServer() {
    if (this._stopWatching) this._stopWatching();
    this._stopWatching = null;
  }

  // -- small pieces -----------------------------------------------------------------------

  _isOver() {
    return this.state === "completed" || this.state === "failed" || this.state === "cancelled";
  }

  /** Wait `ms` (Infinity: until woken). finish(), add() and the browser's "online" event
   * wake it early, so a retry starts as soon as the network is back. */
  _sleep(ms, wakeWhenOnline = false) {
    return new Promise((resolve) => {
      let timer = null;
      const wake = () => {
        clearTimeout(timer);
        if (wakeWhenOnline) removeEventListener("online", wake);
        this._wakeUp = null;
        resolve();
      };
      if (ms !== Infinity) timer = setTimeout(wake, ms);
      if (wakeWhenOnline) addEventListener("online", wake);
      this._wakeUp = wake;
    });
  }

  _wake() {
    if (this._wakeUp) this._wakeUp();
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", { state });
  }

  _progress() {
    this.emit("progress", this.progress);
  }

  _record() {
    return { fileId: this.fileId, serverUrl: this.serverUrl, mimeType: this.mimeType,
             createdAt: this._createdAt, nextIndex: this._nextIndex,
             bytesRecorded: this._bytesRecorded, lastIndex: this._lastIndex };
  }

  /** Rebuild an upload from its stash record and chunks (see resumePendingUpload). */
  _restore({ record, chunks, stash }) {
    this._stash = stash;
    this._createdAt = record.createdAt;
    this._nextIndex = record.nextIndex;
    this._lastIndex = record.lastIndex;
    this._bytesRecorded = record.bytesRecorded;
    this._queue = chunks.map(({ index, blob }) => ({ index, blob, size: blob.size,
                                                     stored: Promise.resolve() }));
    const pending = this._queue.reduce((sum, chunk) => sum + chunk.size, 0);
    this._bytesAcknowledged = record.bytesRecorded - pending;
    this._sentHighest = record.nextIndex - 1;   // any of them may have left before the reload
    this._resync = true;                        // so ask the server first
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

// ------------------------------------------------------------------------------------------
// Uploads left unfinished by an earlier page load
// ------------------------------------------------------------------------------------------

/** Uploads whose chunks are still stashed and that no open tab is sending, oldest first:
 * [{ fileId, serverUrl, mimeType, createdAt, chunksRecorded, bytesRecorded, chunksPending,
 *    ended }] (ended: false when the page went away while recording). Pass { serverUrl } to see only the uploads meant for that server. */
export async function findPendingUploads({ serverUrl } = {}) {
  const stash = await openStash();
  const wanted = serverUrl === undefined ? null : String(serverUrl).replace(/\/+$/, "");
  const found = [];
  for (const record of await stash.listUploads()) {
    if (wanted !== null && record.serverUrl !== wanted) continue;
    if (await sentByAnotherTab(record.fileId)) continue;
    found.push({
      fileId: record.fileId, serverUrl: record.serverUrl, mimeType: record.mimeType,
      createdAt: record.createdAt, chunksRecorded: record.nextIndex,
      bytesRecorded: record.bytesRecorded,
      chunksPending: await stash.chunkCount(record.fileId),
      ended: record.lastIndex !== null,
    });
  }
  return found.sort((a, b) => (a.createdAt < b.createdAt ? -1 : 1));
}

/** Finish an upload found by findPendingUploads(). Returns its M1Upload (already started;
 * await .done, or listen to its events). A recording cut short by the reload ends where the
 * stash ends. `options` as for M1Upload (callbacks, retry, headers). */
export async function resumePendingUpload(fileId, options = {}) {
  const stash = await openStash();
  const record = await stash.upload(fileId);
  if (!record) throw new Error(`no pending upload ${fileId} in this browser`);
  const chunks = await stash.chunks(fileId);
  const upload = new M1Upload({ serverUrl: record.serverUrl, mimeType: record.mimeType,
                                ...options, fileId, _resume: { record, chunks, stash } });
  upload.start();
  upload.finish();
  return upload;
}

/** Forget a pending upload's stashed chunks (the server keeps what it has). */
export async function discardPendingUpload(fileId) {
  const stash = await openStash();
  await stash.forget(fileId);
}

// ------------------------------------------------------------------------------------------
// HTTP: one chunk as multipart/form-data, and the status request
// ------------------------------------------------------------------------------------------

/** POST one chunk. XMLHttpRequest rather than fetch: only it reports upload progress. */
function postChunk(url, fields, blob, { headers, timeoutMs, started, onProgress }) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const [name, value] of Object.entries(fields)) form.append(name, value);
    form.append("file", blob, "chunk");       // last: the server has every field before the bytes
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.timeout = timeoutMs;
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && event.total > 0) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      const body = parseJson(xhr.responseText);
      if (xhr.status === 200 && body && body.success) resolve(body.data);
      else reject(errorFromReply(xhr.status, body, xhr.getResponseHeader("Retry-After")));
    });
    xhr.addEventListener("error", () => reject(new M1UploadError(
      "no answer (network error, or the server is down)")));
    xhr.addEventListener("timeout", () => reject(new M1UploadError(
      `no answer from the server within ${timeoutMs} ms`, { code: "timeout" })));
    xhr.addEventListener("abort", () => reject(new M1UploadError(
      "request aborted", { status: -1, code: "aborted" })));
    started(xhr);
    xhr.send(form);
  });
}

/** GET /api/video/status/:fileId -> its `data` ({ exists, nextChunkIndex, state, ... }). */
/** `url` with `?token=` added (media and event URLs: <video src>, EventSource and WebSocket
 * cannot send an Authorization header); unchanged without a token. */
export function withToken(url, token) {
  if (!token) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

export async function getStatus(serverUrl, fileId, headers = {},
                                timeoutMs = DEFAULT_REQUEST_TIMEOUT_MS) {
  const url = `${String(serverUrl || "").replace(/\/+$/, "")}/api/video/status/` +
              encodeURIComponent(fileId);
  const controller = typeof AbortController !== "undefined" ? new AbortController() : null;
  const timer = controller ? setTimeout(() => controller.abort(), timeoutMs) : null;
  let response;
  try {
    response = await fetch(url, { headers, cache: "no-store",
                                  signal: controller ? controller.signal : undefined });
  } catch (error) {
    throw new M1UploadError("no answer (network error, or the server is down)");
  } finally {
    clearTimeout(timer);
  }
  const body = parseJson(await response.text().catch(() => ""));
  if (response.status !== 200 || !body || !body.success) {
    throw errorFromReply(response.status, body, response.headers.get("Retry-After"));
  }
  return body.data;
}

function errorFromReply(status, body, retryAfter) {
  const error = (body && body.error) || {};
  const seconds = Number(retryAfter);
  return new M1UploadError(error.message || `the server answered HTTP ${status}`, {
    status, code: error.code || "http_" + status,
    retryAfterMs: Number.isFinite(seconds) ? seconds * 1000 : 0,
  });
}

function parseJson(text) {
  try { return JSON.parse(text); } catch (error) { return null; }
}

// ------------------------------------------------------------------------------------------
// Following an upload on the server: events (WebSocket, then SSE), else polling
// ------------------------------------------------------------------------------------------
//
// GET /api/video/events/:fileId (docs/events.md) tells what the server did with an upload:
// a `state` first (the status reply, as a full refresh), then `chunk` {bytesReceived} for every
// chunk stored, `completed`, and, when the server processes videos, `processing` {progress,
// stage}, then `ready` {playbackUrl, derivatives} or `failed` {reason}. One URL serves a
// WebSocket and Server-Sent Events. When neither is possible (503: the server's subscriber cap
// is reached; a proxy that blocks both; an older server), GET /api/video/status every
// STATUS_POLL_INTERVAL_MS tells the same story with less detail, as `state` events.

/**
 * Follow `fileId` on the server: onEvent(event, via) gets the server's events as they come
 * (via: "websocket", "sse" or "polling"; polling delivers `state` events only). The watch ends
 * by itself when the story does (ready, failed, deleted; or completed when the server does not
 * process videos, see storyEnded), or when the server says the token expired
 * (`token_expired`: watch again with a new token to go on). Returns stop(), to end it sooner.
 * options: headers (for polling only: a WebSocket or EventSource cannot send headers),
 * pollIntervalMs, token.
 */
export function watchUpload(serverUrl, fileId, onEvent, options = {}) {
  const base = String(serverUrl || "").replace(/\/+$/, "");
  const path = "/api/video/events/" + encodeURIComponent(fileId);
  // token: WebSocket and EventSource cannot send headers, so a server with --api-key gets the
  // (read) token as ?token= on the stream's URL; polling sends `headers`.
  const { headers = {}, pollIntervalMs = STATUS_POLL_INTERVAL_MS, token = null } = options;
  let lastId = null;             // the newest event id seen: where a reconnect resumes
  let stopped = false;
  let socket = null, source = null, pollTimer = null, retryTimer = null;

  function stop() {
    if (stopped) return;
    stopped = true;
    if (socket) socket.close(1000);
    if (source) source.close();
    clearTimeout(pollTimer);
    clearTimeout(retryTimer);
  }

  function deliver(event, via) {
    if (stopped) return;
    if (event.id) lastId = event.id;
    onEvent(event, via);
    if (event.type === "missed") refresh(via);          // fell behind: get the whole state
    else if (event.type === "completed") refresh(via);  // does processing follow? ask
    else if (event.type === "token_expired") stop();    // this token opens nothing more
    else if (storyEnded(event)) stop();
  }

  // The status once more, as a `state` event: it says whether processing follows `completed`.
  function refresh(via) {
    getStatus(base, fileId, headers)
      .then((status) => deliver({ type: "state", fileId, status }, via))
      .catch(() => {});            // the stream goes on; its next event says more
  }

  function resumeQuery() {
    const query = [];
    if (lastId) query.push("lastEventId=" + encodeURIComponent(lastId));
    if (token) query.push("token=" + encodeURIComponent(token));
    return query.length ? "?" + query.join("&") : "";
  }

  // 1. WebSocket. Refused before it opened (503, blocked): try SSE. Dropped after it opened
  //    (a server restart): open it again, resuming after the last event seen.
  function openWebSocket() {
    if (typeof WebSocket === "undefined") return openEventSource();
    let opened = false;
    try {
      socket = new WebSocket(websocketUrl(base) + path + resumeQuery());
    } catch (error) {
      return openEventSource();    // e.g. a page whose policy forbids ws:
    }
    socket.onopen = () => { opened = true; };
    socket.onmessage = (message) => deliver(parseJson(message.data) || {}, "websocket");
    socket.onclose = () => {
      socket = null;
      if (stopped) return;
      if (!opened) openEventSource();
      else retryTimer = setTimeout(openWebSocket, EVENTS_RECONNECT_MS);
    };
  }

  // 2. Server-Sent Events. EventSource reconnects by itself (Last-Event-ID); it gives up, and
  //    we poll, only when an answer is not a 200 text/event-stream (503, 404 of an old server).
  function openEventSource() {
    if (stopped) return;
    if (typeof EventSource === "undefined") return poll();
    source = new EventSource(base + path + resumeQuery());
    source.onmessage = (message) => deliver(parseJson(message.data) || {}, "sse");
    source.onerror = () => {
      if (source && source.readyState === EventSource.CLOSED) {
        source = null;
        poll();
      }
    };
  }

  // 3. Polling: the status reply is exactly what a `state` event carries.
  function poll() {
    if (stopped) return;
    getStatus(base, fileId, headers)
      .then((status) => deliver({ type: "state", fileId, status }, "polling"))
      .catch(() => {})             // no answer this time: ask again at the next tick
      .then(() => { if (!stopped) pollTimer = setTimeout(poll, pollIntervalMs); });
  }

  openWebSocket();
  return stop;
}

/** Whether nothing more will happen to the upload after `event`: processing ended (ready,
 * failed), the upload was deleted, or a state shows it completed with no processing to
 * follow (a server without processing, or with --processing off, or without ffmpeg). */
export function storyEnded(event) {
  if (event.type === "ready" || event.type === "failed" || event.type === "deleted") {
    return true;
  }
  if (event.type !== "state" || !event.status) return false;
  const { state, processing } = event.status;
  if (state !== "completed") return false;
  return !processing || ["done", "failed", "unavailable"].includes(processing.state);
}

/** A status reply (a `state` event, or polling) as the client events it amounts to. */
function clientEventsFromStatus(serverUrl, status) {
  if (!status || !status.exists) return [];
  const events = [["serverprogress", {
    state: status.state === "completed" ? "completed" : "uploading",
    bytesReceived: status.fileSize || 0,
    chunksReceived: status.nextChunkIndex !== undefined ? status.nextChunkIndex
                                                        : status.chunksReceived || 0,
  }]];
  const processing = status.state === "completed" && status.processing;
  if (!processing) return events;
  if (processing.state === "done") {
    events.push(["ready", readyDetail(serverUrl, status.fileId, status)]);
  } else if (processing.state === "failed") {
    events.push(["processingfailed", { reason: processing.error || "processing failed" }]);
  } else if (processing.state === "queued" || processing.state === "running") {
    events.push(["processing", { progress: processing.progress || 0,
                                 stage: processing.stage || null }]);
  }
  return events;
}

/** The `ready` detail, from a ready event or a status reply (both carry these fields). */
function readyDetail(serverUrl, fileId, source) {
  const absolute = (url) => (!url || /^https?:/.test(url) ? url || null : serverUrl + url);
  const derivatives = source.derivatives || source.urls || {};   // urls: events.ready()
  return { fileId, playbackUrl: absolute(source.playbackUrl),
           poster: absolute(derivatives.poster), derivatives, video: source.video || null };
}

function websocketUrl(base) {
  if (/^https?:/.test(base)) return base.replace(/^http/, "ws");
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + base;
}

// ------------------------------------------------------------------------------------------
// The stash: chunks not yet acknowledged, in IndexedDB
// ------------------------------------------------------------------------------------------
//
// Two object stores: "uploads" (one record per upload: fileId, serverUrl, mimeType,
// nextIndex, bytesRecorded, lastIndex) and "chunks" (key [fileId, index], the bytes as an
// ArrayBuffer, which every browser can store). A chunk and its upload record are written in
// one transaction, so a reload finds either both or neither.

let stashPromise = null;

function openStash() {
  if (!stashPromise) {
    stashPromise = openDatabase().then((db) => new IndexedDbStash(db))
      .catch(() => new MemoryStash());    // private windows of some browsers have no IndexedDB
  }
  return stashPromise;
}

function openDatabase() {
  return new Promise((resolve, reject) => {
    if (typeof indexedDB === "undefined") throw new Error("no IndexedDB");
    const request = indexedDB.open(DB_NAME, DB_VERSION);
    request.onupgradeneeded = () => {
      const db = request.result;
      if (!db.objectStoreNames.contains("uploads")) {
        db.createObjectStore("uploads", { keyPath: "fileId" });
      }
      if (!db.objectStoreNames.contains("chunks")) {
        db.createObjectStore("chunks", { keyPath: ["fileId", "index"] });
      }
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
    request.onblocked = () => reject(new Error("IndexedDB is blocked by another tab"));
  });
}

class IndexedDbStash {
  constructor(db) {
    this.db = db;
    this.persistent = true;
  }

  async putChunk(record, index, blob) {
    const bytes = await blob.arrayBuffer();
    // "strict": the commit reaches the disk before we send, so even a power cut loses nothing
    // that the server has not acknowledged.
    return this._write(["uploads", "chunks"], (tx) => {
      tx.objectStore("uploads").put(record);
      tx.objectStore("chunks").put({ fileId: record.fileId, index, bytes, type: blob.type });
    }, "strict");
  }

  saveUpload(record) {
    return this._write(["uploads"], (tx) => tx.objectStore("uploads").put(record), "strict");
  }

  deleteChunk(fileId, index) {
    return this._write(["chunks"], (tx) => tx.objectStore("chunks").delete([fileId, index]));
  }

  forget(fileId) {
    return this._write(["uploads", "chunks"], (tx) => {
      tx.objectStore("uploads").delete(fileId);
      tx.objectStore("chunks").delete(IDBKeyRange.bound([fileId, 0], [fileId, Infinity]));
    });
  }

  async listUploads() {
    return this._read("uploads", (store) => store.getAll());
  }

  async upload(fileId) {
    return this._read("uploads", (store) => store.get(fileId));
  }

  chunkCount(fileId) {
    return this._read("chunks", (store) =>
      store.count(IDBKeyRange.bound([fileId, 0], [fileId, Infinity])));
  }

  async chunks(fileId) {
    const rows = await this._read("chunks", (store) =>
      store.getAll(IDBKeyRange.bound([fileId, 0], [fileId, Infinity])));
    return rows.map((row) => ({ index: row.index,
                                blob: new Blob([row.bytes], { type: row.type || "" }) }));
  }

  _write(stores, work, durability = "default") {
    return new Promise((resolve, reject) => {
      const tx = this.db.transaction(stores, "readwrite", { durability });
      work(tx);
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error || new Error("IndexedDB transaction aborted"));
    });
  }

  _read(storeName, query) {
    return new Promise((resolve, reject) => {
      const request = query(this.db.transaction(storeName, "readonly").objectStore(storeName));
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
  }
}

/** Same interface, kept in memory: retries and resume still work, a reload loses the chunks. */
class MemoryStash {
  constructor() {
    this.persistent = false;
    this.records = new Map();
    this.stored = new Map();       // "fileId/index" -> { fileId, index, blob }
  }
  async putChunk(record, index, blob) {
    this.records.set(record.fileId, { ...record });
    this.stored.set(record.fileId + "/" + index, { fileId: record.fileId, index, blob });
  }
  async saveUpload(record) { this.records.set(record.fileId, { ...record }); }
  async deleteChunk(fileId, index) { this.stored.delete(fileId + "/" + index); }
  async forget(fileId) {
    this.records.delete(fileId);
    for (const [key, chunk] of this.stored) if (chunk.fileId === fileId) this.stored.delete(key);
  }
  async listUploads() { return [...this.records.values()]; }
  async upload(fileId) { return this.records.get(fileId); }
  async chunkCount(fileId) { return (await this.chunks(fileId)).length; }
  async chunks(fileId) {
    return [...this.stored.values()].filter((chunk) => chunk.fileId === fileId)
      .sort((a, b) => a.index - b.index).map(({ index, blob }) => ({ index, blob }));
  }
}

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/** Exponential backoff with jitter: about base * 2^(attempt-1), capped, randomised between
 * half and all of it so that many clients retrying after one server restart spread out. */
export function backoffDelay(attempt, { baseDelayMs, maxDelayMs } = DEFAULT_RETRY) {
  const ceiling = Math.min(maxDelayMs, baseDelayMs * 2 ** (attempt - 1));
  return Math.round(ceiling / 2 + Math.random() * ceiling / 2);
}

async function sha256Hex(blob) {
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Whether an open tab is sending this upload: it holds the upload's Web Lock (see start()).
 * We try to take the lock for up to LOCK_WAIT_MS, since the lock of a page that was just
 * reloaded is released a moment after the new page starts. */
async function sentByAnotherTab(fileId) {
  if (typeof navigator === "undefined" || !navigator.locks) return false;
  const options = typeof AbortSignal !== "undefined" && AbortSignal.timeout
    ? { signal: AbortSignal.timeout(LOCK_WAIT_MS) } : { ifAvailable: true };
  try {
    return await navigator.locks.request(LOCK_PREFIX + fileId, options, (lock) => lock === null);
  } catch (error) {
    return true;                   // still held when the wait ran out
  }
}

/** Callback options (onProgress, onCompleted, ...) become event listeners. */
function addCallbacks(target, options) {
  for (const [name, callback] of Object.entries(options)) {
    if (/^on[A-Z]/.test(name) && typeof callback === "function") {
      const type = name.slice(2).toLowerCase();
      target.addEventListener(type, (event) => callback(event.detail, event));
    }
  }
}
