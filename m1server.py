#!/usr/bin/env python3
"""m1server - a video chunk upload server on the Python standard library alone.

Browsers record with MediaRecorder and send each Blob as a numbered chunk while they record;
m1server stores every chunk, appends them in order into one file per upload
(`uploads/<fileId>.webm`), survives retries, reorders and crashes, and tells the client exactly
where the upload stands. Run it with `python3 m1server.py` (see `--help`).

This file only starts it; read on in httpapi.py, where a chunk's way through the code begins.
CPython compiles the script it runs at every start (it caches the bytecode of imported modules
only): compiling the whole server here cost 10 ms and 3.8 MiB of memory at every start, about
all of the footprint SPEC section 9 allows above `python3 -m http.server` (docs/performance.md).
"""
import sys

import httpapi

main = httpapi.main

if __name__ == "__main__":
    sys.exit(main())
