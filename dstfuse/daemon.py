"""The mount daemon: storages plus the FUSE filesystem, run under trio.

It owns one mount's life: check the mount point, build every storage
(`assembly.py`), mount the filesystem (`fs.py`), announce readiness only once
the storage files can be seen in the mount, serve until unmounted or told to
stop, then flush every storage and close everything. It never exits 0
unless the final flush succeeded: that flush is what `dstfuse umount`'s
"every acknowledged write is on the nodes" rests on.

Life of a mount::

    check mount point -> load config (and nbd_tls's PEM files) -> PR_SET_IO_FLUSHER
    -> open_assembly (nodes, algorithms, storages; all closed on failure)
    -> pyfuse3.init (the mount exists) -> NBD listeners (`nbd_listen:`) -> serve
    -> probe: stat every storage file through the mount -> READY
    ... `reload` written to .dst/.reload: re-read the config, apply the
        difference all or nothing (live_reload.py), refresh grown files
    ... unmount (fusermount3 -u) or SIGTERM/SIGINT (the daemon unmounts)
    -> NBD sessions drained -> requests in progress finish -> session closed (mount gone)
    -> flush every storage -> close storages, then nodes
    -> result file "ok" / "failed: ..." -> exit 0 / 1

The mount goes away before the final flush, so nothing can wait on a mount
that no longer answers while the nodes are being flushed.

Readiness goes to systemd (``READY=1`` through $NOTIFY_SOCKET, for
``--foreground`` under a service manager) and/or to a pipe given by
`ready_fd` (the detached daemon tells `dstfuse mount` "live <status>",
with a "warning <text>" line per degraded or failed storage, or
"error <reason>" there). The outcome of the final flush is written to
``<runtime dir>/<escaped mountpoint>.result`` (named in `.dst/.daemon`),
which is how `dstfuse umount`, not being the daemon's parent, learns it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import ssl
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import trio

from . import busypoll, congestion, sdnotify
from .algorithms import ControlFile
from .allocator import IDLE_PERIOD, keep_io_buffers, return_free_heap_when_idle
from .assembly import Assembly, open_assembly
from .config import MountConfig, load_mount_config, parse_mount_options
from .control import DAEMON_FILE, RELOAD_FILE, ControlTree, DaemonInfo
from .errors import DstError, UserError
from .export.nbd_tls import server_context
from .fanout import gather
from .live_reload import LiveReload
from .storage import Storage
from .storage_server import StorageNbdServer
from .units import format_size

log = logging.getLogger(__name__)

PR_SET_IO_FLUSHER = 57

#: The mount-wide -o options (`config.MOUNT_OPTIONS`) that go on to FUSE;
#: every option is also handed to the algorithms as `mount_options`.
FUSE_OPTIONS = ("allow_other", "debug")

#: How long the storage files may take to show up once the filesystem is
#: mounted (the kernel's INIT and our first lookups); only a bug exceeds it.
LIVE_TIMEOUT = 30.0


# ------------------------------------------------------------------ helpers


def escape_path(path: str | os.PathLike[str]) -> str:
    """`path` as one file name, the way `systemd-escape --path` spells it
    ("/mnt/vol 1" -> "mnt-vol\\x201"; "/" -> "-")."""
    parts = [part for part in os.fspath(path).split("/") if part]
    if not parts:
        return "-"
    text = "/".join(parts)
    out = []
    for index, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif (char.isascii() and (char.isalnum() or char in ":_.")) and not (
            index == 0 and char == "."
        ):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def runtime_directory() -> Path | None:
    """Where per-mount logs and results go: /run/dstfuse for root,
    $XDG_RUNTIME_DIR/dstfuse otherwise; None if neither can be made."""
    if os.geteuid() == 0:
        base = Path("/run")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"])
    else:
        return None
    directory = base / "dstfuse"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        log.warning("cannot create %s: %s", directory, exc.strerror)
        return None
    return directory


def runtime_file(mountpoint: str | os.PathLike[str], suffix: str) -> Path | None:
    """`<runtime dir>/<escaped mountpoint><suffix>`, e.g. the mount's log."""
    directory = runtime_directory()
    if directory is None:
        return None
    return directory / f"{escape_path(os.path.abspath(mountpoint))}{suffix}"


def check_mountpoint(mountpoint: str | os.PathLike[str]) -> Path:
    """The absolute mount point, if it is an empty directory that is not
    already a mount; UserError (one line) otherwise."""
    path = Path(os.path.abspath(mountpoint))
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"mount point {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UserError(
                f"mount point {path} is a FUSE mount whose daemon is gone; "
                f"run 'dstfuse umount {path}' first"
            ) from None
        raise UserError(f"mount point {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise UserError(f"mount point {path} is already a mount; unmount it first")
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise UserError(f"mount point {path}: {exc.strerror}") from None
    if entries:
        raise UserError(f"mount point {path} is not empty ({len(entries)} entries)")
    return path


def set_io_flusher() -> bool:
    """Mark this process as one that flushes I/O for the kernel, so memory
    reclaim does not wait on writes that only we can complete (a loop
    device on our file). Needs CAP_SYS_RESOURCE and Linux >= 5.6."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        reason = str(exc)
    log.warning(
        "cannot set PR_SET_IO_FLUSHER (%s); under memory pressure a loop device on this "
        "mount may deadlock",
        reason,
    )
    return False


class Readiness:
    """Tells whoever waits for the mount that it is live or has failed:
    systemd (when `notify`) and/or the `dstfuse mount` parent through the
    pipe `ready_fd`: "live <status>\\n" followed by one "warning <text>\\n"
    per degraded or failed storage, or "error <reason>\\n"; then EOF. Reports
    once; the pipe is closed after the first report."""

    def __init__(self, ready_fd: int | None, *, notify: bool) -> None:
        self._fd = ready_fd
        self._notify = notify
        self.reported = False
        #: A `dstfuse mount` parent waits on the pipe and prints a failure
        #: on its terminal; our own output is then only the mount's log.
        self.has_parent = ready_fd is not None
        #: The reason reported by `failed`, if it was called.
        self.failure: str | None = None
        if ready_fd is not None:
            # Nothing we start (fusermount3) may keep the parent waiting.
            os.set_inheritable(ready_fd, False)

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, line.encode(errors="replace"))
        except OSError as exc:
            log.warning("cannot report readiness to the parent: %s", exc.strerror)
        finally:
            os.close(fd)

    def live(self, status: str, warnings: Iterable[str] = ()) -> None:
        """The mount is live: `status` is one line saying what is mounted,
        `warnings` say what is not as it should be (a degraded storage)."""
        if self.reported:
            return
        self.reported = True
        if self._notify:
            sdnotify.ready(status)
        lines = [f"live {status}", *(f"warning {warning}" for warning in warnings)]
        self._send("".join(" ".join(line.split()) + "\n" for line in lines))

    def failed(self, message: str) -> None:
        if self.reported:
            return
        self.reported = True
        self.failure = message
        self._send("error " + " ".join(message.split()) + "\n")

    def close(self) -> None:
        """Close the pipe unreported (the parent sees EOF: the daemon died)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def storage_warning(storage: Storage) -> str | None:
    """Why `storage` is degraded or failed, naming each node that is not
    clean and, for an unreachable one, the error it was not reached with
    (what `dstfuse status` shows, plus the reason); None otherwise (a
    resync that is under way is shown in the status line only)."""
    state = storage.state
    if state not in ("degraded", "failed"):
        return None
    problems = []
    for placement in storage.placements():
        node_state = storage.algorithm.node_state(placement)
        if node_state == "clean":
            continue
        node = placement.node
        problem = f"node {placement.cookie} ({node.description}) {node_state}"
        if node_state == "offline" and node.offline_reason:
            problem += f": {node.offline_reason}"
        problems.append(problem)
    return f"storage {storage.name} is {state}" + (": " + "; ".join(problems) if problems else "")


def _write_result(path: Path | None, text: str) -> None:
    if path is None:
        return
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as exc:
        log.error("cannot write the result file %s: %s", path, exc.strerror)


# ------------------------------------------------------------------- daemon


class MountDaemon:
    """One mount, from `open_assembly` to the final flush (see module doc)."""

    def __init__(
        self,
        config: MountConfig,
        mountpoint: Path,
        options: Mapping[str, str | bool],
        readiness: Readiness,
        *,
        result_path: Path | None,
        nbd_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.nbd_tls = nbd_tls
        self.mountpoint = mountpoint
        self.options = dict(options)
        self.readiness = readiness
        self.result_path = result_path
        self._session = None
        self._tree: ControlTree | None = None
        self._serving = False
        self._stopping = False
        self._interrupted: str | None = None

    def fuse_options(self) -> set[str]:
        return {name for name in FUSE_OPTIONS if self.options.get(name)}

    async def _retire_idle_workers(self) -> int:
        """The quiet daemon's FUSE handler tasks beyond the few kept retire
        (`FuseSession.retire_idle_workers`); how many."""
        retired = 0 if self._session is None else await self._session.retire_idle_workers()
        if retired:
            log.debug("%s: quiet: %d idle FUSE handler tasks retired", self.mountpoint, retired)
        return retired

    async def run(self) -> int:
        error: BaseException | None = None
        result = 1
        busypoll.install(self.config.busy_poll)
        congestion.install(self.config.tcp_congestion)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals, nursery.cancel_scope)
                nursery.start_soon(
                    return_free_heap_when_idle, IDLE_PERIOD, self._retire_idle_workers
                )
                try:
                    result = await self._mount_and_serve()
                except BaseException as exc:
                    error = exc  # raised below, outside the nursery, unwrapped
                nursery.cancel_scope.cancel()
        if self._interrupted and not self._serving:
            raise UserError(f"interrupted by {self._interrupted} before the mount was live")
        if error is not None:
            raise error
        return result

    async def _watch_signals(self, signals, startup: trio.CancelScope) -> None:
        async for number in signals:
            name = signal.Signals(number).name
            if self._stopping:
                log.info("%s: already stopping (flushing the storages)", name)
            elif self._session is not None and self._serving:
                self._stopping = True
                log.info("%s: unmounting %s", name, self.mountpoint)
                open_files = self._session.filesystem.open_handles()
                if open_files:
                    log.warning(
                        "%s: storage files still open (%s); their users will get errors",
                        self.mountpoint,
                        ", ".join(f"{n}: {c}" for n, c in sorted(open_files.items())),
                    )
                sdnotify.stopping(f"unmounting {self.mountpoint}")
                self._session.stop()
            else:
                log.info("%s: stopping before the mount is live", name)
                self._interrupted = name
                startup.cancel()

    async def _mount_and_serve(self) -> int:
        from .fs import FuseSession, StorageFilesystem

        force = bool(self.options.get("force", False))
        async with open_assembly(
            self.config, mount_options=self.options, force=force, on_failure=self._not_assembled
        ) as assembly:
            info = DaemonInfo(
                pid=os.getpid(),
                config=self.config.path,
                mountpoint=self.mountpoint,
                result=self.result_path,
            )
            text = info.render()
            reloads = LiveReload(self.config, assembly, self)
            tree = self._tree = ControlTree(
                assembly.storages,
                {
                    DAEMON_FILE: ControlFile(read=lambda: text),
                    RELOAD_FILE: reloads.control_file(),
                },
            )
            filesystem = StorageFilesystem(assembly.exposed, tree)
            session = FuseSession(filesystem, str(self.mountpoint), options=self.fuse_options())
            failure: str | None = None
            try:
                session.mount()
                self._session = session
                failure = await self._serve(session, assembly)
            finally:
                # From here on, signals must not cancel the final flush.
                self._stopping = True
                self._session = None
                # Unmount (lazily) now, before the final flush: a mount that
                # nobody serves would hang whoever touches it.
                session.close(unmount=True)
                log.info("%s: unmounted", self.mountpoint)
            flushed = await self._final_flush(assembly)
        if failure is not None:
            _write_result(self.result_path, f"failed: {failure}\n")
            return 1
        if flushed is not None:
            _write_result(self.result_path, f"failed: {flushed}\n")
            log.error("final flush failed: %s", flushed)
            return 1
        _write_result(self.result_path, "ok\n")
        log.info("%s: every storage flushed; exiting", self.mountpoint)
        return 0

    def storages_added(
        self, storages: Mapping[str, Storage], exposed: Mapping[str, Storage]
    ) -> None:
        """A reload added `storages` (LiveMount): a control directory each,
        and a file for each of the `exposed` ones."""
        assert self._tree is not None, "reloads run only while mounted"
        for storage in storages.values():
            self._tree.add_storage(storage)
        if self._session is not None:
            for storage in exposed.values():
                self._session.filesystem.add_storage(storage)

    async def storage_resized(self, storage: Storage) -> None:
        """A reload grew `storage`: make the kernel take its file's new
        size now (invalidate, then stat through the mount from a thread,
        which the filesystem answers), so `losetup -c` finds it."""
        session = self._session
        if session is None:
            return
        session.filesystem.storage_resized(storage.name)
        path = self.mountpoint / storage.name
        try:
            size = (await trio.to_thread.run_sync(os.stat, path)).st_size
        except OSError as exc:
            log.warning("storage %s: cannot stat %s after it grew: %s", storage.name, path, exc)
            return
        log.info("storage %s: %s now shows %d bytes", storage.name, path, size)

    def _not_assembled(self, error: BaseException) -> None:
        """Report a mistake that stopped the assembly at once, before the
        parts opened so far are closed (each may take up to its close
        timeout): the reason must reach the terminal and the log even if
        this daemon is killed while closing."""
        if not isinstance(error, UserError):
            return
        if self.readiness.has_parent:
            log.error("mount failed: %s", error)
        self.readiness.failed(str(error))

    async def _serve(self, session, assembly: Assembly) -> str | None:
        """Serve until unmounted or stopped (the storages over NBD too, with
        `nbd_listen:`, bound before the mount is announced); the reason the
        mount failed to become live, if it did."""
        failure: list[str] = []
        error: BaseException | None = None
        nbd = None
        nbd_done = trio.Event()
        async with trio.open_nursery() as nursery:
            if self.config.nbd_listen:
                nbd = StorageNbdServer(
                    assembly.exposed, self.config.nbd_listen,
                    allow=self.config.nbd_allow, tls=self.nbd_tls,
                )
                await nursery.start(self._serve_nbd, nbd, nbd_done)
            nursery.start_soon(self._announce_when_live, session, assembly, failure)
            try:
                await session.serve()
            except BaseException as exc:
                error = exc
            if nbd is not None:
                # Drained before the final flush, which must cover every
                # write an NBD client was told was done.
                nbd.shutdown()
                await nbd_done.wait()
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return failure[0] if failure else None

    @staticmethod
    async def _serve_nbd(
        nbd: StorageNbdServer, done: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await nbd.serve(task_status=task_status)
        finally:
            done.set()

    async def _announce_when_live(self, session, assembly: Assembly, failure: list[str]) -> None:
        expected = {name: storage.size for name, storage in assembly.exposed.items()}
        paths = [self.mountpoint / name for name in expected]

        def probe() -> None:
            # Goes through the kernel: returns once INIT is done and our
            # lookups answer, i.e. once users can see the files.
            for path in paths:
                size = os.stat(path).st_size
                if size != expected[path.name]:
                    raise OSError(errno.EIO, f"size {size}, expected {expected[path.name]}")
            os.stat(self.mountpoint / ".dst" / DAEMON_FILE)

        try:
            with trio.fail_after(LIVE_TIMEOUT):
                await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
        except (OSError, trio.TooSlowError) as exc:
            reason = f"the mount at {self.mountpoint} did not become usable: {exc}"
            log.error("%s", reason)
            failure.append(reason)
            self.readiness.failed(reason)
            session.stop()
            return
        self._serving = True
        status = f"mounted at {self.mountpoint}: " + ", ".join(
            f"{name} ({format_size(storage.size)}, {storage.state})"
            for name, storage in assembly.exposed.items()
        )
        if not session.fallocate_supported:
            status += "; no discard"
        log.info("%s", status)
        warnings = [
            warning
            for warning in map(storage_warning, assembly.exposed.values())
            if warning is not None
        ]
        for warning in warnings:
            log.warning("%s", warning)
        self.readiness.live(status, warnings)

    async def _final_flush(self, assembly: Assembly) -> str | None:
        """Flush every top-level storage (which flushes the storages under
        it through their StorageNodes); the failures, or None."""
        names = list(assembly.exposed)
        if not names:
            return None
        log.info("flushing %s", ", ".join(names))
        with trio.CancelScope(shield=True):
            outcomes = await gather([assembly.exposed[name].flush for name in names])
        failures = []
        for name, (_, error) in zip(names, outcomes, strict=True):
            if error is None:
                continue
            if isinstance(error, DstError):
                failures.append(f"storage {name}: {error}")
            else:
                log.error("storage %s: final flush failed", name, exc_info=error)
                failures.append(f"storage {name}: {error!r}")
        return "; ".join(failures) or None


def run_mount(
    config_path: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *,
    foreground: bool = True,
    options: Iterable[str] = (),
    ready_fd: int | None = None,
) -> int:
    """Run the mount daemon in this process until it is unmounted; the exit
    status (0 only if the final flush succeeded). `options` are the `-o`
    arguments as given (checked against the config's algorithms). Mistakes raise UserError
    after being reported on `ready_fd`. With `foreground`, readiness is also
    sent to systemd when $NOTIFY_SOCKET is set. A daemon with a `ready_fd`
    logs a mistake and returns 1 instead (its parent prints the reason)."""
    readiness = Readiness(ready_fd, notify=foreground)
    try:
        path = check_mountpoint(mountpoint)
        config = load_mount_config(config_path)
        mount_options = parse_mount_options(options, config)
        nbd_tls = server_context(config.nbd_tls)
        if config.tcp_congestion is not None:
            congestion.check(config.tcp_congestion)
        if mount_options.get("debug"):
            logging.getLogger("dstfuse").setLevel(logging.DEBUG)
        result_path = runtime_file(path, ".result")
        if result_path is not None:
            try:
                result_path.unlink()
            except FileNotFoundError:
                pass
        set_io_flusher()
        keep_io_buffers()
        daemon = MountDaemon(
            config, path, mount_options, readiness, result_path=result_path, nbd_tls=nbd_tls
        )
        log.info("mounting %s at %s (pid %d)", config.path, path, os.getpid())
        return trio.run(daemon.run)
    except UserError as exc:
        logged = readiness.has_parent and readiness.failure == str(exc)
        readiness.failed(str(exc))
        if not readiness.has_parent:
            raise  # the command line prints it: on the terminal or in the journal
        # The parent prints it on its terminal; the log gets it here, once.
        if not logged:
            log.error("mount failed: %s", exc)
        return 1
    except BaseException as exc:
        readiness.failed(f"internal error: {exc!r} (see the log)")
        raise
    finally:
        readiness.close()
