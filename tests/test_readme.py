"""The README's examples work as written: its Python blocks run, and its commands parse.

The ``OnnxExplainer`` block needs the graph that the README's ``vdm-export --out ...`` command
writes: that command (every default) is the session's ``digits_onnx`` export, run through the same
CLI in a temporary working directory, so the block runs on that graph.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _commands() -> list[list[str]]:
    """Every ``vdm-*`` (or ``-m vdm_engine.cli.*``) command in the bash blocks, as argv, comments removed."""
    cmds = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if "-m" in argv and argv[argv.index("-m") + 1].startswith("vdm_engine.cli."):
                i = argv.index("-m")
                argv = ["vdm-" + argv[i + 1].rsplit(".", 1)[1], *argv[i + 2:]]
            if argv and argv[0].startswith("vdm-"):
                cmds.append(argv)
    return cmds


def _exec(code: str, name: str) -> None:
    exec(compile(code, f"README.md ({name})", "exec"), {"__name__": "__readme__"})


def test_readme_has_the_examples_these_tests_run():
    assert any("Explainer.from_pretrained" in b for b in _blocks("python"))
    assert any("OnnxExplainer" in b for b in _blocks("python"))
    assert any(c[0] == "vdm-export" for c in _commands())


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_commands_parse_and_write_outside_docs(argv):
    """Each command's arguments are accepted by its parser (nothing runs), and none writes into docs/."""
    mod = importlib.import_module(f"vdm_engine.cli.{argv[0][len('vdm-'):]}")
    parser = getattr(mod, "build_parser", None) or getattr(mod, "_parser")
    args = parser().parse_args(argv[1:])
    out = getattr(args, "out", None)
    assert out is None or not Path(out).parts[:1] == ("docs",), f"{' '.join(argv)} writes over committed files"


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [b for b in _blocks("python") if "OnnxExplainer" not in b]
    assert blocks
    for i, code in enumerate(blocks):
        _exec(code, f"python block {i}")


def test_readme_onnx_snippet_runs_on_the_readme_export(digits_onnx, tmp_path, monkeypatch):
    import shutil

    from tests.conftest import DIGITS_ONNX

    (argv,) = [c for c in _commands() if c[0] == "vdm-export" and "--model" not in c]
    # the README's command is the one the session ran for digits_onnx (same CLI, same working-directory path)
    assert argv == ["vdm-export", "--out", DIGITS_ONNX], f"update DIGITS_ONNX in tests/conftest.py: {argv}"
    (tmp_path / DIGITS_ONNX).parent.mkdir(parents=True)
    shutil.copy(digits_onnx, tmp_path / DIGITS_ONNX)
    monkeypatch.chdir(tmp_path)
    (code,) = [b for b in _blocks("python") if "OnnxExplainer" in b]
    _exec(code, "OnnxExplainer block")
