#!/usr/bin/env python3
"""Build dist/m1server.pyz: the whole server in one file, runnable as `python3 m1server.pyz`.

It packs every runtime module at the repository root (m1server.py, httpapi.py, multipart.py,
chunkstore.py, ...) and the static/ folder, if there is one, with the standard library's
`zipapp`. Static files are read through the module loader (httpapi.read_resource), so they
are served from inside the archive. Tests, benchmarks and tools are left out.

Each module also goes in as bytecode (<name>.pyc beside <name>.py, unchecked-hash pycs of PEP
552): zipimport cannot write a bytecode cache, so without them every start of the pyz compiles
every module again (tens of milliseconds and a few MiB of compiler memory, each start). The
bytecode is that of the Python running this script; any other version finds a magic number it
does not know, ignores the .pyc and compiles the .py beside it, as before.
"""
from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import sys
import tempfile
import zipapp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = "import sys\nimport m1server\nsys.exit(m1server.main())\n"


def runtime_files():
    modules = sorted(name for name in os.listdir(ROOT)
                     if name.endswith(".py") and not name.startswith(("test_", "conftest")))
    static = []
    static_dir = os.path.join(ROOT, "static")
    for folder, _, files in os.walk(static_dir):
        for name in files:
            static.append(os.path.relpath(os.path.join(folder, name), ROOT))
    return modules + sorted(static)


def build(output):
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    staging = tempfile.mkdtemp(prefix="m1dist-")
    try:
        files = runtime_files()
        for name in files:
            target = os.path.join(staging, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, name), target)
            if name.endswith(".py") and os.sep not in name:
                py_compile.compile(target, cfile=target + "c", doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        with open(os.path.join(staging, "__main__.py"), "w", encoding="utf-8") as f:
            f.write(MAIN)
        zipapp.create_archive(staging, output, interpreter="/usr/bin/env python3",
                              compressed=True)
    finally:
        shutil.rmtree(staging)
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "dist", "m1server.pyz"))
    args = parser.parse_args()
    files = build(args.output)
    print("built %s (%d bytes): %s" % (args.output, os.path.getsize(args.output),
                                        ", ".join(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
