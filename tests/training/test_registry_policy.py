"""Issue 11: training never explains with the wrong gates.

A run that does not learn a mask is never registered, and training replaces existing (shipped or
registered) gates only when asked with `--register` / ``register=True``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import vdm_engine.training.loop as loop
from vdm_engine import Explainer, Gates
from vdm_engine.cli.train import main
from vdm_engine.registry import RegistrationRefused, list_gates, registered_gates, registry_home, shipped_gates
from vdm_engine.training import TrainConfig, new_gates, train_gates
from vdm_engine.training.data import toy_batch
from vdm_engine.training.loop import CHECKPOINT, GATES_DIR, METRICS

SHIPPED_DIGITS = Gates.from_pretrained(shipped_gates("vit-digits")).sha256


def _registry_entries() -> list:
    return [e for e in list_gates() if e.source == "registry"]


def _summary(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def pretend_learned(monkeypatch):
    """Short runs cannot learn a mask; this makes the quality gate pass, the policy being under test."""
    monkeypatch.setattr(loop, "mask_failure", lambda *a, **k: None)


def _tiny_cmd(model, out, *extra):
    return ["--model", str(model), "--data", "toy", "--out", str(out), "--steps", "10", "--batch-size", "8",
            "--val-size", "16", "--eval-interval", "10", "--device", "cpu", "--no-progress", *extra]


def test_readme_example_keeps_the_shipped_gates_and_register_is_refused(tmp_path, capsys):
    """The issue's "done when": the README's command (20 steps instead of 200: it learns no mask either)."""
    out = tmp_path / "g"
    readme = ["--model", "vit-digits", "--data", "digits", "--steps", "20", "--device", "cpu", "--no-progress"]
    assert main([*readme, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = _summary(captured.out)
    assert summary["kept"] >= 0.95 and not summary["learned_mask"] and summary["registered"] is None
    assert "did not learn a mask" in summary["registration"] and "keep 100% of the patches" in summary["did_not_learn"]
    err = captured.err.strip()
    assert err.startswith("vdm-train: did not learn a mask") and "\n" not in err
    assert Explainer.from_pretrained("vit-digits").gates.sha256 == SHIPPED_DIGITS
    assert _registry_entries() == []

    out2 = tmp_path / "g2"
    assert main([*readme, "--out", str(out2), "--register"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("vdm-train: error: refusing to register the gates: the run did not learn a mask")
    assert "\n" not in err and "Traceback" not in err and str(out2) in err
    assert _summary(captured.out)["registration"].startswith("refused")
    assert {p.name for p in out2.iterdir()} >= {CHECKPOINT, METRICS, GATES_DIR}  # the run's files stay
    assert Explainer.from_pretrained("vit-digits").gates.sha256 == SHIPPED_DIGITS
    assert _registry_entries() == []


def test_cli_first_gates_fill_the_empty_slot_and_only_register_replaces(tmp_path, tiny_model_dir, pretend_learned,
                                                                        capsys):
    model = str(tiny_model_dir)
    assert registered_gates(model) is None
    assert main(_tiny_cmd(model, tmp_path / "a")) == 0
    first = _summary(capsys.readouterr().out)
    assert first["registered"] and "the first gates" in first["registration"]
    sha_a = Gates.from_pretrained(tmp_path / "a" / GATES_DIR).sha256
    assert Gates.from_pretrained(registered_gates(model)).sha256 == sha_a

    assert main(_tiny_cmd(model, tmp_path / "b", "--seed", "3")) == 0  # other gates, no --register
    captured = capsys.readouterr()
    second = _summary(captured.out)
    assert second["registered"] is None and "already has registered gates" in second["registration"]
    assert "pass --register" in captured.err
    assert Gates.from_pretrained(registered_gates(model)).sha256 == sha_a

    assert main(_tiny_cmd(model, tmp_path / "c", "--seed", "3", "--register")) == 0
    third = _summary(capsys.readouterr().out)
    assert third["registered"] and "replaced the registered gates" in third["registration"]
    sha_c = Gates.from_pretrained(tmp_path / "c" / GATES_DIR).sha256
    assert sha_c != sha_a and Gates.from_pretrained(registered_gates(model)).sha256 == sha_c


def test_cli_no_register_never_registers(tmp_path, tiny_model_dir, pretend_learned, capsys):
    assert main(_tiny_cmd(tiny_model_dir, tmp_path / "a", "--no-register")) == 0
    summary = _summary(capsys.readouterr().out)
    assert summary["learned_mask"] and summary["registered"] is None and "--no-register" in summary["registration"]
    assert registered_gates(str(tiny_model_dir)) is None


def test_cli_register_replaces_shipped_gates_and_remove_restores_them(tmp_path, pretend_learned, capsys):
    from vdm_engine.cli.gates import main as gates_main

    cmd = ["--model", "vit-digits", "--data", "digits", "--steps", "5", "--batch-size", "8", "--val-size", "16",
           "--device", "cpu", "--no-progress"]
    assert main([*cmd, "--out", str(tmp_path / "a")]) == 0  # a "learned" run, no --register: shipped gates stay
    assert "already has shipped gates" in _summary(capsys.readouterr().out)["registration"]
    assert Explainer.from_pretrained("vit-digits").gates.sha256 == SHIPPED_DIGITS

    assert main([*cmd, "--out", str(tmp_path / "b"), "--register"]) == 0
    summary = _summary(capsys.readouterr().out)
    assert "replaced the shipped gates" in summary["registration"]
    assert Explainer.from_pretrained("vit-digits").gates.sha256 == Gates.from_pretrained(tmp_path / "b" / GATES_DIR).sha256

    assert gates_main(["remove", "vit-digits"]) == 0
    assert Explainer.from_pretrained("vit-digits").gates.sha256 == SHIPPED_DIGITS


# ----- the Python API follows the same policy ---------------------------------------------------------
SMALL = TrainConfig(steps=10, batch_size=8, eval_interval=10, checkpoint_interval=10, val_size=12, warmup_steps=5)


@pytest.fixture
def toy_pixels(tiny_backbone):
    return tiny_backbone.preprocess(toy_batch(32, 0)[0]), tiny_backbone.preprocess(toy_batch(12, 1)[0])


def _train(backbone, pixels, out, cfg=SMALL, **kw):
    explainer = Explainer(backbone, new_gates(backbone, cfg))
    return train_gates(explainer, *pixels, cfg, out_dir=out, progress=False, **kw)


def test_api_default_does_not_override_existing_gates(tiny_backbone, toy_pixels, tmp_path, pretend_learned):
    first = _train(tiny_backbone, toy_pixels, tmp_path / "a")
    assert first.learned_mask and first.registered == registered_gates("vit-tiny")
    second = _train(tiny_backbone, toy_pixels, tmp_path / "b", replace(SMALL, seed=4))
    assert second.registered is None and "already has registered gates" in second.registration
    assert Gates.from_pretrained(registered_gates("vit-tiny")).sha256 == Gates.from_pretrained(first.gates_dir).sha256
    # The shipped gates of an embedded model name are not replaced either.
    third = _train(tiny_backbone, toy_pixels, tmp_path / "c", register_as="vit-toy")
    assert third.registered is None and "already has shipped gates" in third.registration
    assert registered_gates("vit-toy") == shipped_gates("vit-toy")
    forced = _train(tiny_backbone, toy_pixels, tmp_path / "d", register=True, register_as="vit-toy")
    assert forced.registered is not None and registered_gates("vit-toy") == forced.registered


def test_api_never_registers_gates_that_did_not_learn(tiny_backbone, toy_pixels, tmp_path, capsys):
    cfg = replace(SMALL, eps_valid=0.0, agreement=1.0, add_init=-5.0)  # everything dropped: not qualified
    res = _train(tiny_backbone, toy_pixels, tmp_path / "a", cfg)
    assert not res.learned_mask and res.registered is None and "no validation met" in res.did_not_learn
    assert "did not learn a mask" in capsys.readouterr().err
    assert Gates.from_pretrained(res.gates_dir).metrics["learned_mask"] is False
    with pytest.raises(RegistrationRefused, match="did not learn a mask") as e:
        _train(tiny_backbone, toy_pixels, tmp_path / "b", cfg, register=True)
    assert e.value.result is not None and e.value.result.registered is None
    assert (tmp_path / "b" / GATES_DIR / "gates.safetensors").is_file()
    assert _registry_entries() == [] and not any(registry_home().glob("*"))


def test_api_rejects_a_model_name_as_register(tiny_backbone, toy_pixels, tmp_path):
    with pytest.raises(ValueError, match="register_as"):
        _train(tiny_backbone, toy_pixels, tmp_path, register="vit-tiny")
    assert not tmp_path.joinpath(CHECKPOINT).exists()
