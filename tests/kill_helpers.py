"""Running ``distillsr`` commands in processes that are SIGKILLed at chosen moments.

Starting Python and importing torch costs seconds, more than a tiny training takes, so the
commands run in processes forked from one prepared process (a fork server) that has
imported torch and distillsr but run nothing: each command is then a fresh process that
runs ``distillsr.cli.main.main(argv)`` and can be killed like any other.

``slow_rename`` makes every rename of a finished temp file onto its final name (the last
step of ``distillsr.io.atomic_write``) wait that many seconds, so that random kill times
often land inside a write: then the temp file is complete but not yet in place, and a
kill leaves it behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


class ForkServer:
    """A prepared process that runs commands in forked children, killing them on request."""

    def __init__(self, env: Optional[Dict[str, str]] = None):
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-c", "import kill_helpers; kill_helpers.serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                     cwd=str(REPO))
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"fork server did not start: {ready!r}")

    def run(self, argv: List[str], kill_after: Optional[float] = None, slow_rename: float = 0.0,
            log: Optional[Path] = None, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> dict:
        """Run ``distillsr argv`` in a fresh child; SIGKILL it ``kill_after`` seconds after it
        starts (None: let it finish). Returns ``{"killed": bool, "code": exit status or None,
        "seconds": float}``."""
        req = {"argv": argv, "kill_after": kill_after, "slow_rename": slow_rename,
               "log": str(log) if log else os.devnull, "env": env or {}, "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server ended")
        return json.loads(line)

    def run_together(self, argvs: List[List[str]], log: Optional[Path] = None, timeout: float = 120) -> List[int]:
        """Run several commands at once, each in its own child; their exit statuses."""
        req = {"together": argvs, "slow_rename": 0.0, "log": str(log) if log else os.devnull, "env": {},
               "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["codes"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _child(req: dict) -> None:
    """In the forked child: set up, run the command, leave with its exit status."""
    try:
        os.setsid()
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(req["env"])
        delay = float(req["slow_rename"])
        if delay:
            real = os.replace

            def slow_replace(src, dst, *a, **kw):
                if os.path.basename(str(src)).endswith(".part"):
                    time.sleep(delay)
                return real(src, dst, *a, **kw)
            os.replace = slow_replace
        from distillsr.cli.main import main
        code = main(req["argv"])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(99)


def serve() -> None:
    """The fork server's loop: one JSON request per line on stdin, one answer per line."""
    import torch  # noqa: F401  (imported once here, so that children start at once)
    import torch._dynamo  # noqa: F401  (what upscale's memory estimate imports on first use)
    import train_helpers  # noqa: F401  (registers the tiny test network)
    import distillsr.cli.main  # noqa: F401
    import distillsr.engine.train  # noqa: F401
    import distillsr.engine.upscale  # noqa: F401
    import distillsr.releases  # noqa: F401
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if "together" in req:
            pids = []
            for argv in req["together"]:
                pid = os.fork()
                if pid == 0:
                    _child(dict(req, argv=argv))
                pids.append(pid)
            codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
            out.write(json.dumps({"codes": codes}) + "\n")
            out.flush()
            continue
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(req)
        killed = False
        deadline = t0 + float(req["timeout"])
        kill_at = None if req["kill_after"] is None else t0 + float(req["kill_after"])
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            now = time.monotonic()
            if (kill_at is not None and now >= kill_at) or now >= deadline:
                os.kill(pid, signal.SIGKILL)
                killed = kill_at is not None and now >= kill_at
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(min(0.002, max(0.0, (kill_at or deadline) - now)))
        code = os.waitstatus_to_exitcode(status)
        out.write(json.dumps({"killed": killed and code == -signal.SIGKILL, "code": code,
                              "seconds": time.monotonic() - t0}) + "\n")
        out.flush()
