"""vdm-serve refuses bad usage in one line (exit 2) before Ray starts; its README command parses."""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="the serve extra is not installed: pip install 'vdm-engine[serve]'")

from vdm_engine.cli import serve as cli  # noqa: E402


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray would fail the test: every case here must be refused before it."""
    import vdm_engine.serve.runner as runner

    def boom(*a, **k):
        raise AssertionError("vdm-serve started serving on bad usage")

    monkeypatch.setattr(runner, "serve_forever", boom)
    monkeypatch.setattr("vdm_engine.serve.serve_forever", boom, raising=False)


@pytest.mark.parametrize("argv,words", [
    (["--device", "tpu"], "--device 'tpu'"),
    (["--model", "no-such-model-anywhere"], "no such model"),
    (["--onnx", "missing.onnx"], "--onnx missing.onnx: no such file"),
    (["--gates", "no/such/dir"], "--gates no/such/dir: no such folder"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be >= 0"),
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--port", "70000"], "--port must be 1..65535"),
    (["--max-body-mb", "0"], "--max-body-mb must be > 0"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1)"),
    (["--model-name", "a/b"], "--model-name must use letters"),
    (["--max-queued", "0"], "--max-queued must be >= 1"),
    (["--model", "vit-digits", "--onnx", "x.onnx"], "not allowed with argument"),
    (["--frobnicate"], "unrecognized arguments"),
    (["--onnx", "x.onnx", "--compile"], "--compile applies to --model"),
    (["--route-prefix", "digits"], "--route-prefix must start with '/'"),
    (["--app-name", "a b"], "--app-name must use letters"),
    (["--metrics-port", "0"], "--metrics-port must be 1..65535"),
    (["--metrics-port", "9100", "--address", "auto"], "--metrics-port applies to the local Ray instance"),
    (["--ingress", "proxy", "--address", "auto"], "--ingress applies to the local Ray instance"),
    (["--ingress", "nginx"], "invalid choice: 'nginx'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_usage_is_one_line_exit_2(no_ray, capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vdm-serve: error: ") and "\n" not in err and "Traceback" not in err, err
    assert words in err, err


def test_readme_commands_parse():
    """Every ``vdm-serve`` command in the README's Serve section is valid usage."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("\n## Serve\n", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line)[1:] for line in section.splitlines() if line.startswith("vdm-serve ")]
    assert len(commands) >= 2, commands
    for argv in commands:
        args = cli._parser().parse_args(argv)
        config = cli._config(args)
        assert config.max_batch >= 1 and args.route_prefix.startswith("/")
