// Upload one file with tus-js-client (the npm package, unchanged) for tests/test_tus_clients.py.
//
//   node tus_upload.mjs ENDPOINT FILE '{"chunkSize": 65536, "pauseAt": 100000, ...}'
//
// Prints one JSON object per line on stdout: {"event": "created"|"paused"|"retry"|"success"
// |"error", ...}. With "pauseAt", the first PATCH whose Upload-Offset is at least that value
// waits (before it is sent) until a line arrives on stdin: the test kills and restarts the
// server meanwhile, so the upload resumes through tus-js-client's own retry logic.
import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { Upload } from 'tus-js-client'

const [endpoint, file, optionsJson] = process.argv.slice(2)
const options = JSON.parse(optionsJson || '{}')
const say = (event) => process.stdout.write(`${JSON.stringify(event)}\n`)

const stdinLines = []
const lineWaiters = []
createInterface({ input: process.stdin }).on('line', (line) => {
  const waiter = lineWaiters.shift()
  if (waiter) waiter(line)
  else stdinLines.push(line)
})
const nextLine = () =>
  stdinLines.length ? Promise.resolve(stdinLines.shift()) : new Promise((r) => lineWaiters.push(r))

let paused = false
const upload = new Upload(readFileSync(file), {
  endpoint,
  chunkSize: options.chunkSize ?? Number.POSITIVE_INFINITY,
  parallelUploads: options.parallelUploads ?? 1,
  overridePatchMethod: options.overridePatchMethod ?? false,
  uploadDataDuringCreation: options.uploadDataDuringCreation ?? false,
  uploadLengthDeferred: options.uploadLengthDeferred ?? false,
  retryDelays: options.retryDelays ?? [0, 100, 200, 400, 800, 1000, 1000, 2000, 2000, 3000, 5000],
  metadata: options.metadata ?? { filename: 'sample.webm', filetype: 'video/webm' },
  async onBeforeRequest(req) {
    const offset = Number(req.getHeader('Upload-Offset') ?? -1)
    if (options.pauseAt != null && !paused && offset >= options.pauseAt) {
      paused = true
      say({ event: 'paused', offset, url: upload.url })
      await nextLine()
    }
  },
  onAfterResponse(req, res) {
    if (req.getMethod() === 'POST' && res.getStatus() === 201) {
      say({ event: 'created', location: res.getHeader('Location') })
    }
  },
  onShouldRetry(err, attempt) {
    const status = err.originalResponse ? err.originalResponse.getStatus() : 0
    const retry = status < 400 || status >= 500 || status === 409 || status === 423
    say({ event: 'retry', attempt, status, retry, message: String(err.message).slice(0, 200) })
    return retry
  },
  onSuccess() {
    say({ event: 'success', url: upload.url })
    process.exit(0)
  },
  onError(err) {
    say({ event: 'error', message: String(err) })
    process.exit(1)
  },
})
upload.start()
