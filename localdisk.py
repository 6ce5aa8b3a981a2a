"""localdisk.py - the upload folder on local disk: room, full disks, links and strays.

Both backends receive chunks into part files in <dir>/temp/.incoming/ (s3store.py uploads them
from there), and chunkstore.py keeps everything in that folder. What either may do there is
written once, here:

  * Room (UploadFolder.room_for). A chunk is on disk more than once while it is stored: its
    part file, and in local mode its copy in the video until the part file is removed. The
    free-space check counts every copy (`copies`), and chunks received at the same time
    reserve their bytes, so each check sees the others. It errs on the safe side: a
    reservation counts in full until its chunk is stored, even as its bytes land on disk.
  * Full disks (writing). Every write that can fail for space (a part file while the parser
    streams, an append, a rename into temp/, the ledger's commit: sqlite3's "database or disk
    is full", a derivative) ends as 507 insufficient_storage, after the caller's undo step has
    put back what was half-written (a tail cut back, a file removed). The HTTP edge turns a
    full disk met anywhere else (a tus piece) into the same 507 (disk_full_error).
  * Links. The store never writes, renames into or deletes through a symbolic link inside the
    folder: its files are opened with O_NOFOLLOW where the platform has it (lstat first where
    it has not), its folders are lstat'ed before use (UploadFolder.own_dir), and a link where
    one of them should be is refused: UnsafePath (500 unsafe_path), logged.
  * Strays (UploadFolder.quarantine). What start-up repair does not recognise as the store's
    own (a folder in temp/.incoming, a file with an unexpected name in temp/.deleting, any
    link) is moved into <dir>/quarantine/ with a log line: never followed, never deleted, and
    the server always starts.

What it does not do: defend against another process racing the store inside its own folder
(the checks are lstat, then use); the folder given with --dir may itself be a link, which is
the operator's choice.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import stat
import threading
import time

import serverlog
from storage import Media, MediaRange, StoreError, read_blocks

log = serverlog.Logger("m1server.store")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

TEMP_DIR_NAME = "temp"
INCOMING_DIR_NAME = ".incoming"          # inside temp/: part files being received
QUARANTINE_DIR_NAME = "quarantine"       # stray entries repair set aside (no dot: not media)
PART_SUFFIX = ".part"
COPY_BLOCK_BYTES = 1 << 20               # buffer for copies when the kernel cannot copy
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_BINARY = getattr(os, "O_BINARY", 0)    # Windows: no newline translation
DISK_FULL_ERRNOS = tuple(getattr(errno, name) for name in ("ENOSPC", "EDQUOT")
                         if hasattr(errno, name))
SQLITE_FULL = 13                         # sqlite3.SQLITE_FULL, named in Python 3.11+
LINK_ERRNOS = (errno.ELOOP, errno.EMLINK)   # open(O_NOFOLLOW) on a link: Linux, FreeBSD


class UnsafePath(StoreError):
    """The store will not follow a link (or use a file where a folder belongs) here."""

    def __init__(self, path, what):
        log.error("refusing to use %s through a symbolic link or a non-folder: %s", what, path)
        StoreError.__init__(self, 500, "unsafe_path", "the store will not use %s: a link or an "
                            "unexpected entry stands there (logged)" % what)


# ---------------------------------------------------------------------------------------------
# Full disks
# ---------------------------------------------------------------------------------------------

def is_disk_full(error):
    """True for an error that means "no space": ENOSPC or EDQUOT, or SQLite's SQLITE_FULL."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL_ERRNOS
    if isinstance(error, sqlite3.DatabaseError):
        return getattr(error, "sqlite_errorcode", None) == SQLITE_FULL or \
            "database or disk is full" in str(error)
    return False


def disk_full_error(error, step="storing the chunk"):
    """The 507 for `error` when it means the disk is full, else None (the HTTP edge's check)."""
    if not is_disk_full(error):
        return None
    return StoreError(507, "insufficient_storage",
                      "the disk is full (%s); nothing of it was kept" % step)


class writing:
    """Around writes that must leave nothing half-written: on any failure `undo()` runs first
    (a tail cut back, a file removed); a full disk then raises 507 insufficient_storage.
    Only wrap writes up to the one that makes them count (the ledger's commit): an undo after
    that would remove what a client may have been told is stored. (A class, not a generator
    context manager: it wraps every write of every chunk, and costs a quarter as much.)"""

    __slots__ = ("step", "undo")

    def __init__(self, step, undo=None):
        self.step = step
        self.undo = undo

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or not isinstance(error, Exception):
            return False                        # no failure (or an exit, not a failure)
        if self.undo is not None:
            try:
                self.undo()
            except Exception:
                log.exception("could not undo a failed write (%s); repair will", self.step)
        full = disk_full_error(error, self.step)
        if full is None:
            return False                        # the error goes on as it was
        log.warning("disk full while %s: %s", self.step, error)
        raise full from None


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------

class UploadFolder:
    """The local folder a store receives part files in: <root>/temp/.incoming/. `copies` is how
    many times a chunk is on this disk while it is stored (2 locally: part file and video; 1
    for S3: the part file), `min_free_bytes` the reserve never to fill (None: no check)."""

    def __init__(self, root, min_free_bytes=None, copies=1):
        self.root = os.path.abspath(root)
        self.temp_dir = os.path.join(self.root, TEMP_DIR_NAME)
        self.incoming_dir = os.path.join(self.temp_dir, INCOMING_DIR_NAME)
        self.quarantine_dir = os.path.join(self.root, QUARANTINE_DIR_NAME)
        self.min_free_bytes = min_free_bytes
        self.copies = copies
        self._reserved = 0
        self._reserved_lock = threading.Lock()
        os.makedirs(self.root, exist_ok=True)
        self.prepare((self.temp_dir, self.incoming_dir))

    # -- receiving ------------------------------------------------------------------------

    def new_part_file(self):
        """A fresh part file for one chunk: (path, file). Unbuffered, so a full disk is met by
        the write that runs into it (never by a later close); created with O_EXCL, which never
        follows a link."""
        self.own_dir(self.incoming_dir, "the incoming folder")
        path = os.path.join(self.incoming_dir, os.urandom(16).hex() + PART_SUFFIX)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | O_BINARY
        return path, open(path, "r+b", buffering=0,
                          opener=lambda name, _: os.open(name, flags, 0o644))

    def discard(self, path):
        """Remove a part file (a link is removed itself, never its target)."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    @contextlib.contextmanager
    def room_for(self, nbytes):
        """Reserve room for a chunk of `nbytes` while it is received and stored: 507
        insufficient_storage when the disk, less what other chunks reserved, would go below
        --min-free-disk. (The rule is here so that every way of storing a chunk shares it.)"""
        need = nbytes * self.copies
        with self._reserved_lock:
            if self.min_free_bytes is not None:
                free = shutil.disk_usage(self.root).free - self._reserved
                if free - need < self.min_free_bytes:
                    raise StoreError(507, "insufficient_storage",
                                     "not enough free disk for this chunk (--min-free-disk)")
            self._reserved += need
        try:
            yield
        finally:
            with self._reserved_lock:
                self._reserved -= need

    # -- links ----------------------------------------------------------------------------

    def own_dir(self, path, what, create=False):
        """`path` must be a real folder (not a link): True when it is, False when it is
        missing (made first with `create`); UnsafePath when something else stands there."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            if not create:
                return False
            os.mkdir(path)
            fsync_dir(os.path.dirname(path))     # the folder's name must survive a power cut
            return True
        if not stat.S_ISDIR(mode):               # S_ISDIR is false for a link (lstat)
            raise UnsafePath(path, what)
        return True

    def remove_tree(self, path):
        """Remove a folder (or file) of the store's below root. A link on the way is set
        aside, never followed; a failure is logged."""
        remove_below(self.root, os.path.relpath(path, self.root).split(os.sep),
                     on_link=lambda link: self.quarantine(link, "a link where the store "
                                                          "keeps its own files"))

    # -- start-up -------------------------------------------------------------------------

    def prepare(self, paths):
        """Make the store's folders that are missing, parents first, never inside a link: at
        a link (logged) the rest is left to repair (make_own_dirs), which runs next."""
        for path in paths:
            try:
                self.own_dir(path, "the store's folder %s" % os.path.basename(path),
                             create=True)
            except UnsafePath:
                return

    def make_own_dirs(self, paths):
        """Repair: each of the store's folders is a real folder. A link (or a file) standing
        in one's place is quarantined and the folder made afresh, so that repair never acts
        on a link's target."""
        for path in paths:
            try:
                self.own_dir(path, "the store's folder %s" % os.path.basename(path),
                             create=True)
            except UnsafePath:
                if self.quarantine(path, "it stands where the store keeps a folder"):
                    self.own_dir(path, os.path.basename(path), create=True)

    def clear_incoming(self):
        """Repair: part files of requests that a crash cut short were never acknowledged, so
        they go; anything else in the incoming folder is set aside."""
        if not self.own_dir(self.incoming_dir, "the incoming folder"):
            return
        for name in os.listdir(self.incoming_dir):
            path = os.path.join(self.incoming_dir, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                self.discard(path)
            else:
                self.quarantine(path, "not a part file")

    def quarantine(self, path, why):
        """Move a stray entry (a link, or something repair does not know) into
        <root>/quarantine/, itself (a link stays a link), and log it. False when that folder
        cannot be used (then the entry is left where it is: logged, not followed)."""
        try:
            self.own_dir(self.quarantine_dir, "the quarantine folder", create=True)
            relative = os.path.relpath(path, self.root)
            target = os.path.join(self.quarantine_dir, "%d-%s-%s" % (
                time.time(), relative.replace(os.sep, "~"), os.urandom(4).hex()))
            os.replace(path, target)
        except (OSError, StoreError) as error:
            log.error("repair: leaving %s in place (%s); could not set it aside: %s",
                      path, why, error)
            return False
        log.warning("repair: set aside %s (%s) as %s", path, why, target)
        return True


def remove_below(root, names, on_link=None):
    """Remove root/names[0]/.../names[-1] (a folder, or a file) without deleting through a
    link: every entry on the way below `root` must be a real folder, and a link found there
    or at the end is handed to `on_link` (default: logged and left) instead."""
    path = root
    for depth, name in enumerate(names):
        path = os.path.join(path, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            if on_link is None:
                log.error("not removing %s: a symbolic link stands at %s", os.path.join(
                    root, *names), path)
            else:
                on_link(path)
            return
        if depth < len(names) - 1 and not stat.S_ISDIR(mode):
            return                                 # nothing of ours can be below a file
    try:
        if stat.S_ISDIR(mode):
            shutil.rmtree(path)        # never follows the links inside (avoids_symlink_attacks)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("could not remove %s (repair tries again at the next start): %s", path,
                    error)


# ---------------------------------------------------------------------------------------------
# Files: opened without following links, copied, compared, synced
# ---------------------------------------------------------------------------------------------

def open_file(path, flags, what, mode=0o644):
    """os.open that never follows a link at `path` (UnsafePath instead)."""
    if not O_NOFOLLOW and os.path.islink(path):
        raise UnsafePath(path, what)
    try:
        return os.open(path, flags | O_NOFOLLOW | O_BINARY, mode)
    except OSError as error:
        if error.errno in LINK_ERRNOS and os.path.islink(path):
            raise UnsafePath(path, what) from None
        raise


def open_reading(path, what):
    """A binary file object for reading `path`, never through a link."""
    return open(path, "rb", opener=lambda name, _: open_file(name, os.O_RDONLY, what))


def fsync_path(path, what):
    fd = open_file(path, os.O_RDONLY, what)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """Make a rename durable (POSIX). Windows cannot open directories; NTFS journals renames."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate(path, length, what):
    """Cut `path` back to `length` bytes, durably (never through a link)."""
    fd = open_file(path, os.O_WRONLY, what)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_into(source_path, fd, size, offset=0):
    """Copy `size` bytes of `source_path`, from `offset` on, to the current position of `fd`."""
    with open_reading(source_path, "a chunk file") as src:
        copy_from(src, fd, size, offset, source_path)


def copy_from(src, fd, size, offset, name):
    """copy_into from an open binary file `src` (`name` says which, in an error)."""
    src.seek(offset)
    copied = 0
    kernel_copy = getattr(os, "copy_file_range", None)
    while kernel_copy is not None and copied < size:
        try:
            n = kernel_copy(src.fileno(), fd, size - copied)
        except OSError as error:
            if is_disk_full(error):
                raise
            break                 # other filesystem, old kernel: copy in user space
        if n == 0:
            break
        copied += n
    src.seek(offset + copied)
    for block in read_blocks(src, size - copied, COPY_BLOCK_BYTES):
        write_all(fd, block)
        copied += len(block)
    if copied != size:
        raise IOError("%s is shorter than %d bytes" % (name, size))


def write_all(fd, view):
    while view:
        n = os.write(fd, view)
        view = view[n:]


def same_region(path, offset, part_path, size):
    """True when `size` bytes of `path` at `offset` equal the whole of `part_path`."""
    with open_reading(path, "a stored chunk") as stored, open(part_path, "rb") as incoming:
        stored.seek(offset)
        remaining = size
        while remaining > 0:
            step = min(remaining, COPY_BLOCK_BYTES)
            if stored.read(step) != incoming.read(step):
                return False
            remaining -= step
    return True


# ---------------------------------------------------------------------------------------------
# Serving a local file
# ---------------------------------------------------------------------------------------------

class FileMedia(Media):
    """A local file to serve: size, ETag and mtime for the headers, and `open_range` to send
    bytes (sendfile(2) where the OS has it), never through a link."""

    def __init__(self, path, size, mtime):
        self.path = path
        self.size = size                  # may be less than the file: its consistent prefix
        self.mtime = mtime
        self.etag = '"%x-%x"' % (size, int(mtime * 1000))

    def open_range(self, start, count):
        return _FileRange(open_reading(self.path, "a video to serve"), start, count,
                          self.path)


class _FileRange(MediaRange):
    def send(self, sock, wfile):
        wfile.flush()
        try:
            sock.sendfile(self._source, self._start, self._count)
            return
        except (AttributeError, NotImplementedError):
            pass
        self._source.seek(self._start)
        remaining = self._count
        while remaining > 0:
            block = self._source.read(min(remaining, COPY_BLOCK_BYTES))
            if not block:
                break
            wfile.write(block)
            remaining -= len(block)
