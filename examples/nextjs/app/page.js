"use client";
// A recorder page that uploads to m1server while it records, through m1client.js.
import { useEffect, useRef, useState } from "react";

// Inlined at build time by Next.js; set it in .env.local or the environment of `next build`.
const SERVER_URL = process.env.NEXT_PUBLIC_M1_SERVER_URL || "http://localhost:3001";

// m1client.js is served by m1server itself. Loading it from there at run time means no npm
// package and no copy to keep in step: the page always gets the client of the server it
// talks to. The comments tell the bundler to leave this import to the browser.
function loadClient() {
  return import(/* webpackIgnore: true */ /* turbopackIgnore: true */
                `${SERVER_URL}/m1client.js`);
}

export default function RecorderPage() {
  const preview = useRef(null);
  const recorder = useRef(null);
  const [ready, setReady] = useState(false);
  const [recording, setRecording] = useState(false);
  const [progress, setProgress] = useState({ state: "idle" });
  const [message, setMessage] = useState(null);       // { kind: "success" | "error", text }
  const [pending, setPending] = useState([]);
  const [videos, setVideos] = useState([]);

  useEffect(() => {
    loadClient()
      .then(async (m1) => {
        setReady(true);
        setPending(await m1.findPendingUploads({ serverUrl: SERVER_URL }));
      })
      .catch((error) => setMessage({ kind: "error",
                                     text: `Cannot load ${SERVER_URL}/m1client.js: ${error}` }));
  }, []);

  // Progress, retries, success and failure, for a new recording or a resumed upload.
  function follow(source) {
    source.addEventListener("progress", (event) => setProgress(event.detail));
    source.addEventListener("retry", (event) => setMessage({ kind: "error",
      text: `Server unreachable, retrying in ${Math.round(event.detail.delayMs)} ms…` }));
    source.addEventListener("completed", (event) => {
      setMessage({ kind: "success", text: `Uploaded ${event.detail.size} bytes.` });
      setVideos((list) => [event.detail, ...list]);
    });
    source.addEventListener("error", (event) => setMessage({ kind: "error",
      text: `Upload failed: ${event.detail.error.message}` }));
  }

  async function start() {
    const { M1Recorder } = await loadClient();
    setMessage(null);
    const next = new M1Recorder({ serverUrl: SERVER_URL });
    follow(next);
    try {
      preview.current.srcObject = await next.openCamera();
      await next.start();
    } catch (error) {
      next.closeCamera();
      setMessage({ kind: "error", text: `Cannot record: ${error.message}` });
      return;
    }
    recorder.current = next;
    setRecording(true);
  }

  async function stop() {
    setRecording(false);
    try {
      await recorder.current.stop();     // resolves when the server has the whole video
    } catch (error) {
      // reported by the "error" listener; the chunks wait in IndexedDB for the next visit
    } finally {
      recorder.current.closeCamera();
      preview.current.srcObject = null;
    }
  }

  async function finishPending(fileId) {
    const { resumePendingUpload } = await loadClient();
    const upload = await resumePendingUpload(fileId);
    follow(upload);
    upload.done.then(() => setPending((list) => list.filter((p) => p.fileId !== fileId)),
                     () => {});
  }

  const percent = progress.state === "completed" ? 100 : progress.bytesRecorded
    ? Math.round(100 * progress.bytesAcknowledged / progress.bytesRecorded) : 0;

  return (
    <main style={{ maxWidth: 720, margin: "0 auto", padding: 24 }}>
      <h1>Record to m1server</h1>
      <p>Uploads to <code>{SERVER_URL}</code> every second while recording.</p>

      {pending.map((item) => (
        <p key={item.fileId} className="pending">
          An earlier recording did not finish uploading ({item.chunksPending} chunks left).{" "}
          <button onClick={() => finishPending(item.fileId)}>Finish upload</button>
        </p>
      ))}

      <video ref={preview} muted playsInline autoPlay
             style={{ width: "100%", aspectRatio: "4 / 3", background: "#111" }} />
      <p>
        <button id="record" onClick={start} disabled={!ready || recording}>Record</button>{" "}
        <button id="stop" onClick={stop} disabled={!recording}>Stop</button>
      </p>

      <div id="progress" role="progressbar" aria-valuenow={percent} aria-valuemin={0}
           aria-valuemax={100} data-state={progress.state} data-file-id={progress.fileId}
           style={{ height: 12, background: "#dde", borderRadius: 6, overflow: "hidden" }}>
        <div style={{ width: `${percent}%`, height: "100%", transition: "width .2s",
                      background: progress.state === "completed" ? "#1f8a4c" : "#2f6fde" }} />
      </div>
      <p>{progress.chunksAcknowledged ?? 0} of {progress.chunksRecorded ?? 0} chunks on the
        server</p>
      {message && <p id="message" className={message.kind}>{message.text}</p>}

      <ul style={{ listStyle: "none", padding: 0 }}>
        {videos.map((video) => (
          <li key={video.fileId}>
            <video src={video.url} controls preload="metadata" style={{ width: "100%" }} />
          </li>
        ))}
      </ul>
    </main>
  );
}
