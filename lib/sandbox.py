"""Run a Python response against its tests in a limited child process (the ``code`` verifier).

Each call starts one child: ``python -I -B`` (isolated: no ``PYTHON*`` variables, no user
site, no bytecode writes), ``-S`` unless site-packages are allowed, with an **empty
environment** (the child sets only ``TMPDIR``, to its working directory), a **fresh
temporary working directory** (removed afterwards), stdin holding
only the job, and stdout/stderr going to files in that directory. Before the response runs,
the child sets its own limits with :func:`resource.setrlimit` (soft = hard, so the code
cannot raise them back):

* ``RLIMIT_CPU`` — CPU seconds (an infinite loop is killed by ``SIGXCPU``);
* ``RLIMIT_AS`` — address space (a huge allocation raises ``MemoryError``);
* ``RLIMIT_FSIZE`` — bytes of any file written, stdout and stderr included (printing
  without end fails with ``EFBIG``: Python ignores ``SIGXFSZ``);
* ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0;

and the parent kills the child's process group after a wall-clock limit (``time.sleep``
uses no CPU). The child then installs an audit hook (:func:`sys.addaudithook`, PEP 578)
that ends the process at once, exit status :data:`BLOCKED_EXIT`, on: opening a network
socket, connecting or binding any socket (a Unix socket pair, as asyncio's loop makes, is
allowed), resolving a name; spawning or signalling a process (``os.fork``, ``os.forkpty``,
``os.system``, ``os.exec*``, ``os.posix_spawn``, ``subprocess.Popen``, ``os.kill``, and
``_posixsubprocess.fork_exec``, which the child replaces before the code runs);
``ctypes``; ``resource.setrlimit``; adding another audit
hook; and writing, renaming or removing files outside the working directory. The hook
ends the process instead of raising, so a ``try/except`` in the response cannot hide the
attempt: such a response fails its check.

This is a guard against accidents and against a policy that drifts into such code (loops,
network, processes, floods of output); it is **not a security boundary** against code
written to escape it: the Python documentation says audit hooks are not a sandbox (for
example, code that walks the interpreter's frames could forge the result line, and
``RLIMIT_NPROC`` is not enforced for root). Run untrusted code in a container or VM.

The test harness counts each top-level ``assert`` statement and each top-level bare
expression (``check(add)``) of ``tests`` as one test (other statements are setup, run in
order); a ``list`` of test strings counts one test per string. The response is the last
fenced Markdown code block of the answer (```` ```python ````, or an unlabelled one),
else the whole answer — the rule open-r1's code reward uses.
"""

from __future__ import annotations

import ast
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BLOCKED_EXIT", "CodeResult", "SandboxLimits", "count_tests", "extract_code",
           "run_python_tests"]

#: Exit status of a child the audit hook stopped (network, process, file outside the folder).
BLOCKED_EXIT = 97

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


class SandboxLimits(BaseModel):
    """Limits of one child process."""

    model_config = ConfigDict(frozen=True)
    cpu_seconds: int = Field(default=5, ge=1, description="RLIMIT_CPU, CPU seconds")
    wall_seconds: float = Field(default=10.0, gt=0, description="killed after this long")
    memory_mb: int = Field(default=512, ge=64, description="RLIMIT_AS, MiB of address space")
    output_bytes: int = Field(default=1 << 20, ge=1024,
                              description="RLIMIT_FSIZE: largest file, stdout/stderr included")
    site_packages: bool = Field(default=False,
                                description="let the code import installed packages (-S off)")


class CodeResult(BaseModel):
    """Outcome of one run: how many tests passed, and why not all."""

    status: Literal["passed", "failed", "error", "timeout", "blocked", "killed"]
    passed: int = 0
    total: int = 0
    reason: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "passed"


def extract_code(response: str) -> str:
    """The last fenced code block labelled python/py (or unlabelled) of ``response``; else
    the whole response."""
    blocks = [m.group(2) for m in _FENCE.finditer(response)]
    return blocks[-1] if blocks else response


def _split_tests(tests: str | list[str]) -> tuple[list[tuple[str, bool]], int]:
    """(units, number of tests): each unit is (source, counts_as_test)."""
    if isinstance(tests, list):
        return [(t, True) for t in tests], len(tests)
    tree = ast.parse(tests)
    units: list[tuple[str, bool]] = []
    n = 0
    for node in tree.body:
        is_test = isinstance(node, (ast.Assert, ast.Expr)) and not (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))  # docstrings
        n += is_test
        units.append((ast.get_source_segment(tests, node) or ast.unparse(node), is_test))
    return units, n


def count_tests(tests: str | list[str]) -> int:
    """Tests in ``tests`` (see the module docstring); raises SyntaxError for bad source."""
    if isinstance(tests, list):
        for t in tests:
            compile(t, "<tests>", "exec", dont_inherit=True)
        return len(tests)
    return _split_tests(tests)[1]


# The child: limits, job from stdin, audit hook, response, tests, one result line. Every
# value the report needs is a local of main(), bound before the response runs (patching
# ``os.write`` or ``json`` from the response changes nothing here).
_CHILD = r'''
import os, resource, sys

def main():
    write, _exit, eval_repr = os.write, os._exit, repr
    def lim(res, value):
        resource.setrlimit(res, (value, value))
    raw = sys.stdin.buffer.read()
    sys.stdin.close()
    head = raw.split(b"\n", 5)
    nonce = head[0].decode()
    cpu, mem, fsize = (int(x) for x in head[1].split())
    n_units = int(head[2])
    sizes = [int(x) for x in head[3].split()]
    flags = head[4].split()
    data = head[5]
    code, data = data[:sizes[0]].decode("utf-8"), data[sizes[0]:]
    units = []
    for i in range(n_units):
        units.append((data[:sizes[i + 1]].decode("utf-8"), flags[i] == b"1"))
        data = data[sizes[i + 1]:]
    lim(resource.RLIMIT_CPU, cpu)
    lim(resource.RLIMIT_AS, mem)
    lim(resource.RLIMIT_FSIZE, fsize)
    lim(resource.RLIMIT_CORE, 0)
    lim(resource.RLIMIT_NOFILE, 64)
    home = os.path.realpath(os.getcwd()) + os.sep
    os.environ["TMPDIR"] = home  # tempfile's files stay in the working directory
    abspath, fspath = os.path.abspath, os.fspath
    W = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    deny = frozenset((
        "socket.connect", "socket.bind", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
        "urllib.Request", "http.client.connect",
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "resource.setrlimit",
        "resource.prlimit", "sys.addaudithook", "os.symlink", "os.link", "os.chroot"))
    deny_import = frozenset(("_posixsubprocess", "ctypes", "_ctypes"))
    paths = frozenset(("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                       "os.truncate", "os.utime", "shutil.rmtree", "os.chflags",
                       "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod"))
    def outside(p):
        if isinstance(p, int):
            return False
        try:
            p = fspath(p)
            if isinstance(p, bytes):
                p = p.decode("utf-8", "surrogateescape")
            return not (abspath(p) + os.sep).startswith(home)
        except Exception:
            return True
    def stop(event, detail=""):
        write(2, ("\nblocked: " + event + (" " + detail if detail else "") + "\n").encode(
            "utf-8", "backslashreplace"))
        _exit(97)
    def hook(event, args):
        if event in deny:
            stop(event)
        elif event == "socket.__new__":
            if args[1] != 1:  # AF_UNIX (1 on Linux and macOS): asyncio's socketpair
                stop(event)
        elif event == "import":
            if args[0] in deny_import:
                stop("import " + args[0])
        elif event == "open":
            path, mode, fl = args[0], args[1], args[2]
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                (fl or 0) & W)
            if writes and outside(path):
                stop("open for writing outside the working directory", eval_repr(path))
        elif event in paths:
            if outside(args[0]):
                stop(event + " outside the working directory", eval_repr(args[0]))
        elif event in ("os.rename", "shutil.move", "shutil.copyfile"):
            if outside(args[0]) or outside(args[1]):
                stop(event + " outside the working directory")
    # subprocess (and asyncio, which imports it) may be imported, but its fork+exec is
    # replaced; importing _posixsubprocess afresh (to get the original back) is blocked
    import _posixsubprocess
    _posixsubprocess.fork_exec = lambda *a, **k: stop("_posixsubprocess.fork_exec")
    sys.addaudithook(hook)
    passed = total = 0
    reason = ""
    ns = {"__name__": "__solution__", "__builtins__": __builtins__}
    def why(e, what):
        tb, line = e.__traceback__, 0
        while tb is not None:
            line = tb.tb_lineno
            tb = tb.tb_next
        if isinstance(e, SyntaxError):
            line, msg = e.lineno or 0, "SyntaxError: " + str(e.msg)
        else:
            msg = type(e).__name__ + (": " + str(e) if str(e) else "")
        return (what + " line " + str(line) + ": " + msg)[:300]
    try:
        exec(compile(code, "<response>", "exec", dont_inherit=True), ns)
        ok = True
    except BaseException as e:
        reason = why(e, "the response raised at")
        ok = False
    for src, is_test in units:
        total += is_test
        if not ok:
            continue
        try:
            exec(compile(src, "<tests>", "exec", dont_inherit=True), ns)
            passed += is_test
        except BaseException as e:
            if not reason:
                first = src.strip().splitlines()[0][:120] if src.strip() else ""
                reason = why(e, "test failed: " + first + " —") if is_test else why(
                    e, "test setup raised at")
            if not is_test:
                ok = False
    write(1, ("\n" + nonce + " " + str(passed) + " " + str(total) + " " + reason.replace(
        "\n", " ") + "\n").encode("utf-8", "backslashreplace"))
    _exit(0)

main()
'''


def run_python_tests(response: str, tests: str | list[str], *,
                     limits: SandboxLimits | None = None, extract: bool = True) -> CodeResult:
    """Run ``response`` (its last fenced code block when ``extract``) then ``tests`` in a
    limited child process; ``status`` is ``passed`` iff every test passed."""
    limits = limits or SandboxLimits()
    code = extract_code(response) if extract else response
    try:
        units, n_tests = _split_tests(tests)
    except SyntaxError as e:
        return CodeResult(status="error", reason=f"tests: SyntaxError at line {e.lineno}: {e.msg}")
    if n_tests == 0:
        return CodeResult(status="error", reason="tests contain no assert or call")
    nonce = secrets.token_hex(16)
    parts = [p.encode("utf-8", "replace") for p in [code, *(u for u, _ in units)]]
    header = (f"{nonce}\n{limits.cpu_seconds} {limits.memory_mb << 20} {limits.output_bytes}\n"
              f"{len(units)}\n{' '.join(str(len(p)) for p in parts)}\n"
              f"{' '.join('1' if t else '0' for _, t in units)}\n").encode()
    job = header + b"".join(parts)
    work = tempfile.mkdtemp(prefix="realign-sandbox-")
    argv = [sys.executable, "-I", "-B"] + ([] if limits.site_packages else ["-S"]) + [
        "-c", _CHILD]
    t0 = time.perf_counter()
    try:
        with open(os.path.join(work, ".stdout"), "wb") as out, \
                open(os.path.join(work, ".stderr"), "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    cwd=work, env={}, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.communicate(job,
                                 timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                proc.wait()
            except BrokenPipeError:  # the child died before reading the job
                proc.wait()
        seconds = time.perf_counter() - t0
        stdout = _tail(os.path.join(work, ".stdout"), limits.output_bytes)
        stderr = _tail(os.path.join(work, ".stderr"), 4096)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _outcome(proc.returncode, timed_out, stdout, stderr, nonce, n_tests, limits, seconds)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _tail(path: str, limit: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - limit))
        return fh.read().decode("utf-8", "replace")


def _outcome(rc: int, timed_out: bool, stdout: str, stderr: str, nonce: str, n_tests: int,
             limits: SandboxLimits, seconds: float) -> CodeResult:
    def res(status: str, reason: str, passed: int = 0) -> CodeResult:
        return CodeResult(status=status, passed=passed, total=n_tests, reason=reason,  # type: ignore[arg-type]
                          seconds=round(seconds, 4))

    if timed_out:
        return res("timeout", f"killed after the wall-clock limit of {limits.wall_seconds:g} s")
    if rc == BLOCKED_EXIT:
        lines = [ln for ln in stderr.splitlines() if ln.startswith("blocked: ")]
        return res("blocked", lines[-1].removeprefix("blocked: ") if lines
                   else f"exit status {BLOCKED_EXIT}")
    if rc < 0:
        sig = -rc
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return res("timeout", f"CPU time limit of {limits.cpu_seconds} s exceeded")
        if sig == signal.SIGXFSZ:
            return res("killed", f"output over {limits.output_bytes} bytes")
        return res("killed", f"killed by signal {signal.Signals(sig).name}")
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce + " "):
            _, passed_s, total_s, *why = line.split(" ", 3)
            passed, total = int(passed_s), int(total_s)
            if passed == total == n_tests:
                return res("passed", f"{passed}/{total} tests passed", passed)
            return res("failed", (why[0] if why else "") or f"{passed}/{total} tests passed",
                       passed)
    last = stderr.strip().splitlines()[-1:] or [f"exit status {rc}"]
    if "File too large" in stderr:
        return res("killed", f"output over {limits.output_bytes} bytes")
    if "MemoryError" in stderr:
        return res("killed", f"memory limit of {limits.memory_mb} MiB exceeded")
    return res("error", f"no result from the child ({last[0][:200]})")
