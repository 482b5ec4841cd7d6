"""The README's Serve section runs as written, against the session's live server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")
pytest.importorskip("requests")
pytest.importorskip("tritonclient.http")

ROOT = Path(__file__).resolve().parents[2]


def _serve_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Serve\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```py\n(.*?)^```", section, flags=re.S | re.M)


def test_readme_client_examples_run(server, monkeypatch, capsys):
    blocks = _serve_blocks()
    assert len(blocks) == 2
    hostport = server.removeprefix("http://")
    monkeypatch.chdir(ROOT)
    for i, code in enumerate(blocks):
        code = code.replace("127.0.0.1:8000", hostport)
        exec(compile(code, f"README.md (Serve block {i})", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("6 ") and out[2] == "6"
    assert out[3] == "(2, 10) (2, 16)"
