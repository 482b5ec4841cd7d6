"""What every console script shares: one-line errors, exit codes, and the checks that run before any slow work."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

__all__ = [
    "run_cli",
    "quiet_transformers",
    "CliParser",
    "UsageError",
    "add_model_source_args",
    "check_device",
    "check_model",
    "check_out_file",
    "check_out_dir",
    "EXIT_USAGE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
]

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT
EXIT_TERMINATED = 143  # SIGTERM: 128 + SIGTERM


class UsageError(Exception):
    """Bad usage or bad input: reported in one line, exit code 2."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` (staging clean-up) runs."""


class CliParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one ``UsageError`` line through ``run_cli`` instead of a usage dump."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _on_sigterm(signum, frame):
    raise _Terminated()


def _one_line_warning(prog: str):
    """A ``warnings.showwarning`` that prints our warnings as ``prog: warning: message``, one line."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        # Only a loaded vdm_engine.provenance can warn: looked up here, so that no CLI imports torch for it.
        provenance = sys.modules.get("vdm_engine.provenance")
        if provenance is not None and issubclass(category, provenance.ProvenanceWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run ``body``; turn expected errors into one line on stderr and an exit code (never a traceback).

    ``UsageError``, ``ValueError``, missing weights or gates, missing files -> 2;
    other runtime failures -> 1; Ctrl-C -> 130; SIGTERM -> 143 (handled like Ctrl-C, so clean-up runs).
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
        # Ctrl-C always interrupts, even where SIGINT came in ignored (a background job of a
        # non-interactive shell inherits it so, and Python then installs no handler at all).
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(prog)
            return int(body() or 0)
    except _usage_errors() as e:  # evaluated only once something was raised
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _usage_errors() -> tuple[type[BaseException], ...]:
    """What ``run_cli`` reports as bad usage. Missing weights and gates are raised only by modules that
    import torch: their classes are taken from those modules once loaded, never imported for this."""
    errors = [UsageError, ValueError, FileNotFoundError]
    for module, name in (("vdm_engine.backbone", "WeightsUnavailableError"), ("vdm_engine.explainer", "GatesNotFoundError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def add_model_source_args(group) -> None:
    """The model options vdm-explain and vdm-serve share: --model or --onnx, --gates, --allow-backbone-mismatch."""
    src = group.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="embedded name, preset, hub id or local directory (default vit-digits)")
    src.add_argument("--onnx", default=None, metavar="PATH", help="an exported graph (vdm-export) run with onnxruntime")
    group.add_argument("--gates", default=None, metavar="DIR", help="gates directory (default: registry, then embedded)")
    group.add_argument("--allow-backbone-mismatch", action="store_true",
                       help="accept gates recorded for another backbone (a fine-tuned copy); warns and records it")


def check_device(device: str | None, *, flag: str = "--device") -> str | None:
    """``device`` as a torch device string, or None for the default; ``UsageError`` for an unknown
    device or a CUDA device this machine does not have."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {device!r} is not a device; use cpu or cuda (cuda:N for one card)") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {device!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device} was asked for but no CUDA device is available; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def parse_labels(text: str | None) -> list[str] | None:
    """``--labels a,b,c`` -> ["a", "b", "c"] (None when not given); ``UsageError`` for an empty or repeated label."""
    if text is None:
        return None
    labels = [x.strip() for x in str(text).split(",")]
    if not all(labels) or len(labels) < 2:
        raise UsageError(f"--labels needs at least two non-empty comma-separated class names, got {text!r}")
    if len(set(labels)) != len(labels):
        raise UsageError(f"--labels repeats a class name: {text!r}")
    return labels


def check_model(model: str, *, revision: str | None = None, flag: str = "--model") -> None:
    """``UsageError`` ("no such model") unless ``model`` is an embedded model, a preset, a local
    ``save_pretrained`` directory, or a hub id (offline: one in the local hub cache).

    Runs before any loading, so an unknown name is never reported as missing gates or as a download error.
    """
    from vdm_engine.models import EMBEDDED_MODELS, PRESETS

    name = str(model)
    if name in EMBEDDED_MODELS or name in PRESETS:
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UsageError(
                f"{flag} {name} is a folder without config.json; pass a directory written by save_pretrained"
            )
        return
    from vdm_engine.backbone import _local_files_only_default  # imports torch: only for a name we cannot place

    offline = _local_files_only_default()
    if not os.path.exists(name) and _is_hub_id(name):
        if not offline:
            return  # the hub decides (and downloads)
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return
    where = "a hub id cached locally (HF_HUB_OFFLINE is set)" if offline else "a valid hub id"
    raise UsageError(
        f"no such model '{name}': not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        f"a preset ({', '.join(PRESETS)}), a local directory, or {where}"
    )


def _is_hub_id(name: str) -> bool:
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:
        return False
    return True


def check_out_file(path: str | os.PathLike, overwrite: bool = False, *, flag: str = "--out") -> Path:
    """Check a file output before any slow work: not a folder, not an existing file (unless
    ``overwrite``), and its folder can be created and written to. Leaves nothing behind."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; expected a file path such as {path / 'model.onnx'}")
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another path")
    _check_writable(path.parent, flag, path, keep=False)
    return path


def check_out_dir(path: str | os.PathLike, *, flag: str = "--out", keep: bool = False) -> Path:
    """Check an output folder before any slow work: an existing writable folder, or one that can be
    created (it is created, then removed again unless ``keep``). An existing file is refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file; expected a folder (a new or an existing one)")
    _check_writable(path, flag, path, keep=keep)
    return path


def _check_writable(folder: Path, flag: str, out: Path, *, keep: bool) -> None:
    """Create ``folder`` if missing and write a probe file into it; ``UsageError`` naming the obstacle.

    ``os.access`` gives the clear message; the real mkdir and write catch what it cannot see (root,
    ACLs, full or read-only file systems). Folders created here are removed again unless ``keep``.
    """
    folder = Path(os.path.abspath(folder))
    missing = []
    existing = folder
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: cannot write into {existing} (read-only or permission denied)")
    created = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
                created.append(d)
            except FileExistsError:  # made meanwhile by another process (torchrun ranks)
                pass
        fd, probe = tempfile.mkstemp(prefix=".vdm-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot write into {e.filename or folder}: {e.strerror or e}") from None
    finally:
        if not keep:
            for d in reversed(created):
                try:
                    d.rmdir()
                except OSError:
                    pass


def quiet_transformers() -> None:
    """No weight-loading progress bars from transformers on our stderr."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass
