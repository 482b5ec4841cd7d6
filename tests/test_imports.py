"""``import vdm_engine`` and the console scripts' ``--help`` stay free of torch (PEP 562 names, imports
inside ``main``); the public names still resolve."""

from __future__ import annotations

import subprocess
import sys

import vdm_engine

_NO_TORCH = """
import contextlib, io, sys
import vdm_engine
from vdm_engine.cli import eval, explain, export, gates, serve, train
for cli in (eval, explain, export, gates, serve, train):
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        cli.main(["--help"])
    assert out.getvalue().startswith("usage: vdm-"), out.getvalue()[:200]
heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime", "ray") if m in sys.modules)
assert not heavy, f"imported {heavy}"
print("ok")
"""


def test_import_and_help_do_not_import_torch():
    res = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-2000:]


def test_every_public_name_resolves_from_its_module():
    import vdm_engine.explainer as explainer

    assert vdm_engine.Explainer is explainer.Explainer
    for name in vdm_engine.__all__:
        assert getattr(vdm_engine, name) is not None and name in dir(vdm_engine)
    assert vdm_engine.__version__
    try:
        vdm_engine.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name resolved")


def test_every_evaluation_and_export_name_resolves():
    import vdm_engine.evaluation as evaluation
    import vdm_engine.export as export
    from vdm_engine.evaluation import runner
    from vdm_engine.export import onnx

    assert evaluation.evaluate is runner.evaluate and export.export_onnx is onnx.export_onnx
    for package in (evaluation, export):
        for name in package.__all__:
            assert getattr(package, name) is not None and name in dir(package), (package.__name__, name)
