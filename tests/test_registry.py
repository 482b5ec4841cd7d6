"""The gates registry: lookup, list, remove, the registration policy and `vdm-gates`."""

from __future__ import annotations

import json

import pytest

from vdm_engine import Gates
from vdm_engine.cli.gates import main as gates_main
from vdm_engine.registry import (
    KEEP_ALL,
    list_gates,
    mask_failure,
    register_gates,
    registered_gates,
    registration_decision,
    registry_home,
    remove_gates,
    shipped_gates,
)


@pytest.fixture
def saved_gates(tmp_path, tiny_gates, tiny_backbone):
    """A gates directory with training-style metrics (kept 30%, agreement 100%)."""
    metrics = {"validation": {"kept": 0.3, "agreement": 1.0, "kl": 0.01}, "learned_mask": True}
    return tiny_gates.save_pretrained(tmp_path / "g", backbone=tiny_backbone, metrics=metrics)


# ----- lookup, list, remove -----------------------------------------------------------------------
def test_registry_entry_hides_shipped_gates_until_removed(saved_gates):
    shipped = shipped_gates("vit-digits")
    assert shipped is not None and registered_gates("vit-digits") == shipped
    entry = register_gates("vit-digits", saved_gates)
    assert registered_gates("vit-digits") == entry and entry.parent == registry_home()
    assert remove_gates("vit-digits") == entry and not entry.exists()
    assert registered_gates("vit-digits") == shipped


def test_register_without_replace_refuses_an_existing_entry(saved_gates):
    register_gates("my-vit", saved_gates, replace=False)
    with pytest.raises(FileExistsError, match="my-vit"):
        register_gates("my-vit", saved_gates, replace=False)


def test_list_gates_shows_registry_entries_and_shipped_ones(saved_gates, tiny_model_dir):
    entries = list_gates()
    assert [(e.model, e.source, e.in_use) for e in entries] == [("vit-digits", "shipped", True), ("vit-toy", "shipped", True)]
    digits = entries[0]
    assert digits.sha256 == Gates.from_pretrained(shipped_gates("vit-digits")).sha256
    assert digits.backbone == "vit-digits" and 0 < digits.kept < 0.5 and digits.agreement >= 0.95

    register_gates("vit-digits", saved_gates)
    register_gates(str(tiny_model_dir), saved_gates)
    by = {(e.model, e.source): e for e in list_gates()}
    assert not by["vit-digits", "shipped"].in_use and by["vit-digits", "registry"].in_use
    mine = by["vit-digits", "registry"]
    assert mine.sha256 == Gates.from_pretrained(saved_gates).sha256
    assert (mine.kept, mine.agreement, mine.learned_mask, mine.backbone) == (0.3, 1.0, True, "vit-tiny")
    local = [e for e in by.values() if e.source == "registry" and e.model != "vit-digits"]
    assert len(local) == 1 and registered_gates(str(tiny_model_dir)) == registry_home() / local[0].model
    remove_gates(local[0].model)  # the key `list` shows works for remove
    assert registered_gates(str(tiny_model_dir)) is None


def test_remove_refuses_shipped_and_unknown_models():
    with pytest.raises(ValueError, match="shipped with the package.*cannot be removed"):
        remove_gates("vit-toy")
    with pytest.raises(ValueError, match="no registered gates for 'nope'"):
        remove_gates("nope")


# ----- the policy ---------------------------------------------------------------------------------
def test_mask_failure_is_the_quality_gate():
    learned = {"kept": 0.4, "kl": 0.05, "agreement": 0.97}
    assert mask_failure(learned, qualified=True) is None
    assert "keep 100% of the patches" in mask_failure(dict(learned, kept=1.0), qualified=True)
    assert mask_failure(dict(learned, kept=KEEP_ALL), qualified=True) is not None
    assert mask_failure(dict(learned, kept=KEEP_ALL - 0.01), qualified=True) is None
    msg = mask_failure(dict(learned, kl=0.4, agreement=0.8), qualified=False, eps_valid=0.15, agreement=0.95)
    assert "no validation met KL <= 0.15 and agreement >= 0.95" in msg and "not kept" in msg
    assert mask_failure(None, qualified=False) is not None


@pytest.mark.parametrize(
    "model,existing,failure,register,expect",
    [
        # the first gates for a model with none fill the empty slot
        ("new-vit", None, None, None, "register"),
        ("new-vit", None, None, True, "register"),
        ("new-vit", None, None, False, "skip"),
        # shipped gates are replaced only when asked
        ("vit-digits", None, None, None, "skip"),
        ("vit-digits", None, None, True, "replace"),
        ("vit-toy", None, None, False, "skip"),
        # so are registered ones
        ("new-vit", "registered", None, None, "skip"),
        ("new-vit", "registered", None, True, "replace"),
        ("vit-digits", "registered", None, None, "skip"),
        # gates that did not learn a mask: never; refused when asked for
        ("new-vit", None, "keeps 100%", None, "skip"),
        ("new-vit", None, "keeps 100%", False, "skip"),
        ("new-vit", None, "keeps 100%", True, "refuse"),
        ("vit-digits", None, "keeps 100%", True, "refuse"),
    ],
)
def test_registration_policy(saved_gates, model, existing, failure, register, expect):
    if existing:
        register_gates(model, saved_gates)
    d = registration_decision(model, failure=failure, register=register)
    got = "refuse" if d.refused else "replace" if d.register and d.replace else "register" if d.register else "skip"
    assert got == expect, d.reason
    assert "\n" not in d.reason
    if failure:
        assert "did not learn a mask" in d.reason
    elif expect == "skip" and register is None:
        assert "already has" in d.reason and "--register" in d.reason


def test_registration_policy_rejects_model_names_as_register():
    with pytest.raises(ValueError, match="register must be None, True or False"):
        registration_decision("vit-digits", failure=None, register="vit-digits")


# ----- vdm-gates ----------------------------------------------------------------------------------
def test_vdm_gates_list_and_json(saved_gates, capsys):
    assert gates_main(["list"]) == 0
    out = capsys.readouterr().out
    assert str(registry_home()) in out and "vit-digits" in out and "shipped" in out and "41%" in out
    register_gates("vit-digits", saved_gates)
    assert gates_main(["list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["registry"] == str(registry_home())
    rows = {(g["model"], g["source"]): g for g in doc["gates"]}
    assert rows["vit-digits", "registry"]["in_use"] and not rows["vit-digits", "shipped"]["in_use"]
    assert rows["vit-digits", "registry"]["kept"] == 0.3 and len(rows["vit-digits", "registry"]["sha256"]) == 64


def test_vdm_gates_remove(saved_gates, capsys):
    entry = register_gates("vit-digits", saved_gates)
    assert gates_main(["remove", "vit-digits", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["removed"] == str(entry) and doc["now_uses"] == str(shipped_gates("vit-digits"))
    assert not entry.exists()

    register_gates("other-vit", saved_gates)
    assert gates_main(["remove", "other-vit"]) == 0
    assert "has no gates now" in capsys.readouterr().out


@pytest.mark.parametrize("model,match", [("vit-digits", "cannot be removed"), ("nope", "no registered gates")])
def test_vdm_gates_remove_errors_are_one_line(model, match, capsys):
    assert gates_main(["remove", model]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vdm-gates: error:") and match in err and "\n" not in err
    assert shipped_gates("vit-digits") is not None  # nothing shipped was touched


@pytest.mark.parametrize("argv", [[], ["drop", "vit-digits"], ["remove"]])
def test_vdm_gates_bad_usage_is_one_line(argv, capsys):
    assert gates_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vdm-gates: error:") and "\n" not in err
