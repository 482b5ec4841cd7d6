"""A real Triton Inference Server on this machine, from the ``nvidia-pytriton`` wheel, without installing it.

The wheel carries ``tritonserver`` (Triton 2.51 for PyTriton 0.7.0), its libraries, the Python
backend and one backend stub per Python version. Installing the package would pin numpy<2, so
``fetch_tritonserver`` downloads the wheel with ``pip download --no-deps`` once into a cache
folder keyed by version (``VDM_TRITONSERVER_HOME``, default ``~/.cache/vdm-engine/tritonserver``)
and unpacks it there; ``TritonServer`` starts the binary on loopback with free ports, waits until
it is ready, and stops it by its pid. The server dies with the process that started it (Linux:
``PR_SET_PDEATHSIG``), so a killed test session leaves no server behind.

Used by the tests and by ``python -m benchmarks.serve_load --server triton``; also a way to try a
python-backend repository written by ``vdm-export --triton-backend python`` on a CPU machine.
On a GPU server, run NVIDIA's container instead (README: Serve with Triton Inference Server).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = [
    "PYTRITON_VERSION",
    "TritonServer",
    "TritonServerDist",
    "TritonServerUnavailable",
    "fetch_tritonserver",
    "tritonserver_home",
]

#: The ``nvidia-pytriton`` wheel whose ``tritonserver`` (2.51) is used.
PYTRITON_VERSION = "0.7.0"
HOME_ENV = "VDM_TRITONSERVER_HOME"
_COMPLETE = ".complete"  # written last into an unpacked version folder


class TritonServerUnavailable(RuntimeError):
    """The ``tritonserver`` binary cannot be had here (no network for the first download, another
    platform, or pip failed); the message says why in one line."""


def tritonserver_home() -> Path:
    """The cache folder: ``$VDM_TRITONSERVER_HOME`` or ``~/.cache/vdm-engine/tritonserver``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vdm-engine" / "tritonserver"


@dataclass(frozen=True)
class TritonServerDist:
    """An unpacked ``nvidia-pytriton`` wheel.

    Attributes:
        root: the unpacked wheel (``root/pytriton/tritonserver``, ``root/nvidia_pytriton.libs``).
        version: the PyTriton version.
    """

    root: Path
    version: str

    @property
    def server_dir(self) -> Path:
        return self.root / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def library_path(self) -> list[str]:
        """``LD_LIBRARY_PATH`` entries: the wheel's bundled libraries, then this Python's ``libpython``
        (the Python backend stub links against it)."""
        paths = [self.root / "nvidia_pytriton.libs", self.server_dir / "lib", self.server_dir / "external_libs"]
        out = [str(p) for p in paths if p.is_dir()]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            out.append(libdir)
        return out

    def backend_directory(self, python: tuple[int, int] | None = None) -> Path:
        """A ``--backend-directory`` whose ``python/`` backend has the stub for ``python`` (default:
        this interpreter's ``major.minor``); made once per version, atomically."""
        tag = "%d.%d" % (python or sys.version_info[:2])
        out = self.root / "backends" / f"py{tag}"
        if (out / "python" / "triton_python_backend_stub").is_file():
            return out
        stub = self.server_dir / "python_backend_stubs" / tag / "triton_python_backend_stub"
        if not stub.is_file():
            have = sorted(p.name for p in (self.server_dir / "python_backend_stubs").iterdir())
            raise TritonServerUnavailable(
                f"nvidia-pytriton {self.version} has no Python backend stub for Python {tag} (it has {', '.join(have)})"
            )

        def make(tmp: Path) -> None:
            shutil.copytree(self.server_dir / "backends" / "python", tmp / "python")
            shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
            os.chmod(tmp / "python" / "triton_python_backend_stub", 0o755)

        return _make_once(out, make, done="python/triton_python_backend_stub")

    def stub_environment(self, *, timeout_s: float = 300.0) -> Path:
        """A virtual environment for the Python backend stub: this interpreter's standard library and
        numpy 1.x (``_STUB_NUMPY``) only; made once per Python version (numpy fetched with pip).

        The stub takes its ``sys.path`` from the first ``python3`` on ``PATH`` (it ignores
        ``PYTHONPATH``), so ``TritonServer`` puts this environment's ``bin`` first. It needs numpy 1:
        the stub of Triton 2.51 reads numpy's array structs with the numpy 1 layout, and under
        numpy 2 it sends empty output tensors and cannot read ``TYPE_STRING`` inputs. A model's own
        packages come from its config (``vdm_python_path``); numpy, imported first, stays the stub's.
        """
        tag = "%d.%d" % sys.version_info[:2]
        out = self.root / "stubenv" / f"py{tag}"
        site_dir = f"lib/python{tag}/site-packages"

        def make(tmp: Path) -> None:
            (tmp / "bin").mkdir(parents=True)
            base = Path(os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable))
            for name in ("python3", f"python{tag}"):
                os.symlink(base, tmp / "bin" / name)
            (tmp / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                            f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary", ":all:", "--quiet",
                   "--retries", "1", "--timeout", "30",
                   "--disable-pip-version-check", "--no-compile", "--target", str(tmp / site_dir), _STUB_NUMPY]
            _pip(cmd, f"pip install {_STUB_NUMPY} for the Python backend stub", timeout_s)

        return _make_once(out, make, done=f"{site_dir}/numpy/__init__.py")


_STUB_NUMPY = "numpy==1.26.4"  # the last numpy 1 (wheels for Python 3.9-3.12)


def _pip(cmd: list[str], what: str, timeout_s: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TritonServerUnavailable(f"{what} took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise TritonServerUnavailable(f"{what} failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")


def _make_once(out: Path, make, *, done: str) -> Path:
    """Build ``out`` with ``make(tmp)`` in a staging folder beside it and rename it into place, unless
    ``out/done`` exists already (another process may win the race: its copy is kept)."""
    if (out / done).exists():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=_mkdir(out.parent)))
    try:
        make(tmp)
        if out.exists() and not (out / done).exists():
            shutil.rmtree(out)  # a folder left half-made by an older layout
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / done).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def fetch_tritonserver(version: str = PYTRITON_VERSION, *, cache_dir: str | os.PathLike | None = None,
                       timeout_s: float = 300.0) -> TritonServerDist:
    """The unpacked wheel of ``nvidia-pytriton==version``, downloaded on first use.

    ``pip download --no-deps`` (the package registry pip is configured for) into a staging folder
    inside the cache, unpacked there with ``zipfile``, executable bits set, then renamed into place:
    a run that dies half-way leaves nothing that a later run takes for complete.

    Raises:
        TritonServerUnavailable: not Linux x86-64, or pip could not fetch the wheel.
    """
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        raise TritonServerUnavailable(f"the nvidia-pytriton wheel is built for Linux x86-64, not {sys.platform} "
                                      f"{os.uname().machine}")
    home = Path(cache_dir) if cache_dir is not None else tritonserver_home()
    root = home / version
    if (root / _COMPLETE).is_file():
        return TritonServerDist(root, version)
    _mkdir(home)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=home))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
               "--retries", "1", "--timeout", "30",
               "--only-binary", ":all:", "--dest", str(staging / "wheel"), f"nvidia-pytriton=={version}"]
        _pip(cmd, f"pip download nvidia-pytriton=={version}", timeout_s)
        wheels = sorted((staging / "wheel").glob("nvidia_pytriton-*.whl"))
        if not wheels:
            raise TritonServerUnavailable(f"pip download nvidia-pytriton=={version} left no wheel in {staging}")
        unpacked = staging / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpacked)
            for info in zf.infolist():  # zipfile drops the permission bits; restore them from the archive
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(unpacked / info.filename, mode)
        dist = TritonServerDist(unpacked, version)
        os.chmod(dist.binary, 0o755)
        (unpacked / _COMPLETE).write_text(json.dumps({"wheel": wheels[0].name}) + "\n")
        try:
            os.replace(unpacked, root)
        except OSError:  # another process unpacked the same version first
            if not (root / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TritonServerDist(root, version)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open together while they are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class TritonServer:
    """``tritonserver`` on 127.0.0.1 serving ``model_repository``; a context manager.

    Args:
        model_repository: the repository folder (``vdm-export --triton-repo``).
        models: load only these models (explicit model control: others can be loaded later with
            ``tritonclient``'s ``load_model``); default: every model in the repository.
        dist: the unpacked wheel (default ``fetch_tritonserver()``).
        log_path: where the server's output goes (default: ``server.log`` in a temporary folder).
        exit_timeout_s: how long Triton waits for in-flight requests on SIGTERM.
        stub_timeout_s: how long the Python backend waits for a model's stub to answer (its
            ``stub-timeout-seconds``).
        extra_args: more ``tritonserver`` flags.

    Attributes:
        http_port, grpc_port, metrics_port: the free loopback ports picked at construction.
        pid: the server's process id once started.
    """

    def __init__(self, model_repository: str | os.PathLike, *, models: Sequence[str] | None = None,
                 dist: TritonServerDist | None = None, log_path: str | os.PathLike | None = None,
                 exit_timeout_s: int = 5, stub_timeout_s: int = 300, extra_args: Sequence[str] = ()):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"no Triton model repository at {self.model_repository}")
        self.models = list(models) if models is not None else None
        self.dist = dist
        self.log_path = Path(log_path) if log_path else None
        self.exit_timeout_s = int(exit_timeout_s)
        self.stub_timeout_s = int(stub_timeout_s)
        self.extra_args = list(extra_args)
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3)
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def http_url(self) -> str:
        """``127.0.0.1:PORT`` as ``tritonclient.http.InferenceServerClient`` takes it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self, dist: TritonServerDist) -> list[str]:
        """The ``tritonserver`` command line (loopback only, the three ports, this Python's stub)."""
        cmd = [str(dist.binary), "--model-repository", str(self.model_repository),
               "--backend-directory", str(dist.backend_directory()),
               "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
               "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
               "--exit-timeout-secs", str(self.exit_timeout_s), "--log-verbose", "0",
               # A model's stub must answer within this; 30 s by default, which importing torch can
               # take on a busy CPU (the load then hangs instead of failing).
               "--backend-config", f"python,stub-timeout-seconds={self.stub_timeout_s}"]
        if self.models is not None:
            cmd += ["--model-control-mode", "explicit"]
            for m in self.models:
                cmd += ["--load-model", m]
        return cmd + self.extra_args

    def start(self, *, timeout_s: float = 180.0) -> "TritonServer":
        """Start the server and wait until ``/v2/health/ready`` (every loaded model ready).

        Raises:
            TritonServerUnavailable: from ``fetch_tritonserver``.
            RuntimeError: the server exited (the message ends with its last log lines).
            TimeoutError: not ready after ``timeout_s`` (the server is stopped).
        """
        if self.proc is not None:
            raise RuntimeError(f"this TritonServer is already running (pid {self.proc.pid})")
        dist = self.dist or fetch_tritonserver()
        self.dist = dist
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="tritonserver.")) / "server.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(dist.stub_environment() / "bin"), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dist.library_path + [p for p in env.get("LD_LIBRARY_PATH", "").split(
            os.pathsep) if p])
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(dist), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _get(self, path: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def is_ready(self) -> bool:
        """``GET /v2/health/ready`` answers 200."""
        try:
            return self._get("/v2/health/ready") == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.proc.returncode} before it was ready: "
                                   f"{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        """The last ``lines`` lines of the server log, joined with `` | `` (for one-line errors)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return "(no log)"
        return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM to the server's pid; SIGKILL if it has not exited after ``timeout_s``. Returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
