"""Run untrusted code against unit tests without letting it hang or harm the caller.

The code and its tests run in a separate Python process, in a fresh temporary directory that is
removed afterwards, in its own session (so a timeout kills it and anything it started), with
no standard input and its output written to size-limited files. Before the code is imported the
child limits itself (address space, CPU seconds, file size, no core dumps) and installs an audit
hook, which Python code cannot remove. The hook refuses network access (every `socket.*` event),
process creation (fork, exec, spawn, `subprocess`, `os.system`), signals to other processes, raising
its own limits (`resource.setrlimit`, which a root process with CAP_SYS_RESOURCE could otherwise do),
ctypes' ways to native code and raw memory (loading a library, finding or calling a foreign function,
`from_address`, `string_at`), and writing, deleting or renaming files outside the sandbox directory
(`/dev/null` aside). ctypes itself stays importable (numpy and pandas import it), and it can still
reach raw memory with no event the hook sees (`ctypes.memmove`, a union of an integer and a pointer),
so code written to escape can undo the hook: the sandbox guards against accidents, not against that.

Each test's outcome reaches the caller through an inherited pipe, one record per test index
(counters in the child could be rewritten by the code under test; earlier records cannot). Code
that sets out to forge records on that pipe could still inflate its score: the sandbox guards the
caller, and makes cheating deliberate rather than accidental.

The tests run under pytest, as KodCode's own harness runs them: test functions and classes
(unittest's too) that import the code as the module `solution`, with parametrized cases, fixtures
and setup methods. pytest's plugins installed beside it are not loaded, nor any configuration from
the directories above. The total is pytest's count of collected cases, never below the number of
test functions the source defines (counted without running it), so code that crashes on import
scores 0 of that many.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_RUNNER = r'''
import os, resource, sys


def main(report_fd, memory, cpu_seconds):
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    root = os.path.realpath(os.getcwd())
    sys.path.insert(0, root)
    inside = lambda p: os.path.realpath(os.fsdecode(p)).startswith(root + os.sep)
    blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
               "os.forkpty", "pty.", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
               "resource.prlimit")
    # ctypes: loading a library, finding or calling a foreign function, reading or wrapping raw memory
    foreign = {"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
               "ctypes.string_at", "ctypes.wstring_at"}
    path_events = ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
                   "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copytree")
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event.startswith(blocked) or event in foreign:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "r", args[2] or 0
            # the root itself: pytest's capture makes an unnamed file there (O_TMPFILE); /dev/null: its logging
            if (flags & write or any(c in str(mode) for c in "wax+")) and not inside(args[0]) \
                    and os.path.realpath(os.fsdecode(args[0])) not in (root, os.devnull):
                raise PermissionError(f"sandbox: writing {args[0]!r} is not allowed")
        elif event in path_events and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")

    import ctypes  # noqa: F401  before the hook: importing it opens the process's own symbols (numpy imports it)
    import pytest  # before the hook: pytest's own imports are trusted

    class Records:
        """'total:N' once the tests are collected, then 'i:P' when test i's call passed, 'i:F' when any phase failed."""

        def __init__(self):
            self.index = {}

        def pytest_collection_finish(self, session):
            self.index = {item.nodeid: i for i, item in enumerate(session.items)}
            os.write(report_fd, f"total:{len(session.items)}\n".encode())

        def pytest_runtest_logreport(self, report):
            i = self.index.get(report.nodeid)
            if i is not None and (report.failed or (report.when == "call" and report.passed)):
                os.write(report_fd, f"{i}:{'F' if report.failed else 'P'}\n".encode())

    sys.addaudithook(hook)
    code = pytest.main(["-q", "-p", "no:cacheprovider", "test_solution.py"], plugins=[Records()])
    sys.exit(0 if code in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) else int(code))


main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
'''


@dataclass(frozen=True)
class TestRun:
    """What a sandboxed test run gave: tests passed of `total`, and how the process ended.

    status: "ok" (exited), "timeout" (killed at the time limit), "error" (exited non-zero before or
    while running the tests: a syntax error, a failed import, a resource limit). detail: the tail of
    the process's standard error.
    """

    passed: int
    total: int
    status: str
    detail: str = ""


def count_tests(tests: str) -> int:
    """How many test functions/methods `tests` defines (parsed, not run); 0 when it does not parse."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return 0
    count = 0
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            count += 1
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            count += sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")
                         for n in node.body)
    return count


def run_unit_tests(code: str, tests: str, timeout: float = 10.0, memory_mb: int = 1024) -> TestRun:
    """Run `tests` against `code` (importable as `solution`) in a sandboxed process.

    timeout: wall-clock seconds for the whole run (the process group is killed after it); memory_mb:
    the child's address-space limit. Tests that passed before a timeout or crash still count.
    """
    if not isinstance(code, str) or not isinstance(tests, str):
        raise ValueError("code and tests must be strings of Python source")
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise ValueError(f"memory_mb must be an int >= 64, got {memory_mb!r}")
    if importlib.util.find_spec("pytest") is None:
        raise ImportError("the sandbox runs tests with pytest, which is not installed: pip install pytest "
                          "(or memgen[code])")
    # the code may delete or lock what its directory holds: the caller reads nothing back by name, and a directory
    # it cannot remove is left behind rather than raised
    with tempfile.TemporaryDirectory(prefix="memgen-sandbox-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        (root / "solution.py").write_text(code)
        (root / "test_solution.py").write_text(tests)
        (root / "_runner.py").write_text(_RUNNER)
        (root / "pytest.ini").write_text("[pytest]\n")  # the rootdir's own: no configuration from directories above
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "OMP_NUM_THREADS": "1",
               "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # no installed plugins: pytest's own, as fast as it starts
        report_read, report_write = os.pipe()
        with open(root / "_stderr", "w+b") as stderr, os.fdopen(report_read, "rb") as report:
            try:
                proc = subprocess.Popen([sys.executable, "-I", "-B", "_runner.py", str(report_write),
                                         str(memory_mb << 20), str(math.ceil(timeout) + 1)], cwd=tmp, env=env,
                                        stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                        start_new_session=True, pass_fds=(report_write,))
            finally:
                os.close(report_write)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # also on an interrupt: never leave the child running
                if proc.returncode is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            lines = report.read(1 << 20).decode(errors="replace").splitlines()
            stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - 2000))  # the child's output, even if unlinked
            detail = stderr.read().decode(errors="replace")
    # pytest's count (parametrized cases each), never below the test functions the source defines
    collected = [int(line[6:]) for line in lines if line.startswith("total:") and line[6:].isdigit()]
    total = max(count_tests(tests), collected[0] if collected else 0)
    passed = {line.split(":")[0] for line in lines if line.endswith(":P")} & {str(i) for i in range(total)}
    failed = {line.split(":")[0] for line in lines if line.endswith(":F")}
    status = "timeout" if timed_out else "ok" if proc.returncode == 0 else "error"
    return TestRun(passed=len(passed - failed), total=total, status=status, detail=detail)
