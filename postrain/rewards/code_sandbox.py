"""The harness code_exec runs a program in: `python -I -B code_sandbox.py CONFIG_FD RESULT_FD` in a scratch folder.

Run as a script in a fresh interpreter (never imported by postrain; standard library only). It reads its settings
from CONFIG_FD, sets its resource limits, installs the guard, runs `solution.py` of the working directory, then
(for assert tests) each test, and writes one JSON line per test and a final line to RESULT_FD, every line
carrying the run's nonce. The parent (postrain.rewards.code_exec) decides the outcome from those lines, the exit
status and, for stdin/stdout tests, the program's output, which it compares itself: the expected output never
enters this process.

The guard is a PEP 578 audit hook, which Python code cannot remove once installed. It refuses, by raising
PermissionError and then ending the process (exit code BLOCKED_EXIT, after a `blocked` line): creating or using
sockets and name lookups; starting processes (fork, exec, spawn, subprocess, os.system); signalling other
processes; ctypes (which could call the C library directly past every other rule) and importing `_ctypes` or
`_posixsubprocess`; opening a file for writing, or creating, removing, renaming, linking or changing one,
outside the working directory; opening or listing anything outside the working directory and the interpreter's
own folders (prefix, standard library, site-packages: what `import` needs). ctypes is imported before the guard
(importing it loads the C library; numpy's import needs ctypes), and its events that load a library, look a
symbol up, call a C function or read memory are refused. Resource limits (setrlimit): CPU seconds, address space,
size of any file written (Python ignores SIGXFSZ: the write fails with EFBIG), no core files.
"""

import ctypes  # noqa: F401  (imported before the guard: its import opens the C library, which numpy's import needs)
import errno
import json
import os
import resource
import sys

BLOCKED_EXIT = 86
MEMORY_EXIT = 87

# Audit events refused outright (prefix match on the event name).
REFUSED_EVENTS = (
    "socket.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "os.setuid", "os.setgid", "os.chroot", "subprocess.Popen", "signal.pthread_kill", "ctypes.",
    "pty.", "os.startfile", "winreg.", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys._current_frames", "resource.setrlimit", "resource.prlimit", "webbrowser.",
)
# ctypes events that read or call nothing (numpy and others use ctypes types); every other one (loading a library,
# looking a symbol up, calling a C function, reading memory at an address) is refused.
HARMLESS_CTYPES = ("ctypes.addressof", "ctypes.cdata/buffer", "ctypes.create_string_buffer",
                   "ctypes.create_unicode_buffer", "ctypes.get_errno", "ctypes.set_errno")
REFUSED_IMPORTS = ("_posixsubprocess",)
# Events whose path arguments must lie in the working directory (they change the filesystem).
WRITE_EVENTS = {
    "os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,), "os.chmod": (0,),
    "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (1,),
    "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "os.mkfifo": (0,),
    "os.mknod": (0,),
}
# Events whose path argument must lie where reading is allowed.
READ_EVENTS = {"os.listdir": 0, "os.scandir": 0, "glob.glob": 0, "os.listxattr": 0, "os.getxattr": 0}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class SandboxViolation(PermissionError):
    pass


def main():
    config_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(config_fd, "r", encoding="utf-8") as f:
        config = json.load(f)
    nonce = config["nonce"]
    results = os.fdopen(result_fd, "w", encoding="utf-8", buffering=1)

    def record(**fields):
        results.write(json.dumps({"nonce": nonce, **fields}) + "\n")
        results.flush()

    workdir = os.path.realpath(os.getcwd())
    limits = config["limits"]
    cpu = max(1, int(limits["cpu_seconds"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")

    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    tests = config.get("tests") or []
    setup = config.get("setup") or ""
    readable = _readable_roots(workdir)

    def inside(path, roots):
        if isinstance(path, int):  # an open file descriptor: already allowed when it was opened
            return True
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return True
        full = os.path.realpath(os.path.join(os.getcwd(), path))
        return any(full == root or full.startswith(root.rstrip(os.sep) + os.sep) for root in roots)

    def refuse(event, detail):
        message = f"{event} {detail}".strip()
        try:
            record(blocked=message)
        finally:
            os._exit(BLOCKED_EXIT)

    def hook(event, args):
        if event.startswith(REFUSED_EVENTS) and event not in HARMLESS_CTYPES:
            refuse(event, "")
        if event == "import" and args and str(args[0]).split(".")[0] in REFUSED_IMPORTS:
            refuse(event, str(args[0]))
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & WRITE_FLAGS)
            if not inside(path, [workdir] if writes else readable):
                refuse(event, f"{path!r} ({'write' if writes else 'read'}) outside the working directory")
        elif event in WRITE_EVENTS:
            for index in WRITE_EVENTS[event]:
                if index < len(args) and not inside(args[index], [workdir]):
                    refuse(event, f"{args[index]!r} outside the working directory")
        elif event in READ_EVENTS:
            index = READ_EVENTS[event]
            if index < len(args) and not inside(args[index], readable):
                refuse(event, f"{args[index]!r} outside the working directory")

    try:
        code = compile(source, "solution.py", "exec")
        setup_code = compile(setup, "setup", "exec") if setup else None
        test_codes = [compile(test, f"test {index}", "exec") for index, test in enumerate(tests)]
    except (SyntaxError, ValueError) as e:
        record(done=True, error=f"{type(e).__name__}: {e}")
        results.close()
        os._exit(0)

    sys.addaudithook(hook)
    # A stdin/stdout program runs as a script (its `if __name__ == "__main__":` block runs); a program under assert
    # tests is a module the tests call into, as human-eval and MBPP run it.
    namespace = {"__name__": "__main__" if config["mode"] == "stdio" else "solution", "__builtins__": __builtins__}
    try:
        try:
            if setup_code is not None:
                exec(setup_code, namespace)
            exec(code, namespace)
        except SystemExit:  # a program may end itself; its output (stdin/stdout tests) is what counts
            pass
        except MemoryError:
            record(done=True, memory=True)
            os._exit(MEMORY_EXIT)
        except BaseException as e:
            _report_error(record, e)
            os._exit(0)
        if config["mode"] == "asserts":
            sys.stdout.flush()
            for index, test in enumerate(test_codes):
                try:
                    exec(test, namespace)
                except AssertionError:
                    record(test=index, ok=False)
                except MemoryError:
                    record(done=True, memory=True)
                    os._exit(MEMORY_EXIT)
                except OSError as e:
                    if e.errno == errno.EFBIG:  # a file (or the output) grew past the file size limit
                        _report_error(record, e)
                        os._exit(0)
                    record(test=index, ok=False, error=f"{type(e).__name__}: {e}"[:300])
                except BaseException as e:
                    record(test=index, ok=False, error=f"{type(e).__name__}: {e}"[:300])
                else:
                    record(test=index, ok=True)
        sys.stdout.flush()
        record(done=True)
    except MemoryError:
        os._exit(MEMORY_EXIT)
    except OSError as e:  # flushing an output past the file size limit
        _report_error(record, e)
    os._exit(0)


def _report_error(record, error):
    if isinstance(error, OSError) and error.errno == errno.EFBIG:
        record(done=True, output_limit=True)
    else:
        record(done=True, error=f"{type(error).__name__}: {error}"[:300])


def _readable_roots(workdir):
    roots = {workdir, os.devnull, "/dev/urandom"}
    for path in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]:
        if path:
            roots.add(os.path.realpath(path))
    return sorted(roots)


if __name__ == "__main__":
    main()
