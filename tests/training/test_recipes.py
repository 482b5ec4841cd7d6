"""The recipe command, sized down: writes a loadable backbone, gates and the metrics JSON."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vdm_engine import Explainer, Gates, load_backbone
from vdm_engine.training import recipes


def test_recipe_toy_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(recipes.RECIPES, "toy", replace(recipes.TOY, steps=15))
    monkeypatch.setitem(recipes.GATE_CONFIGS, "toy", dict(steps=10, eval_interval=5, checkpoint_interval=5, val_size=20))
    assert recipes.main(["toy", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["recipe"] == "toy" and {"recall", "precision", "agreement"} <= set(line["evaluation"])
    bb = load_backbone(str(tmp_path / "m" / "backbone"))
    assert bb.grid == (4, 4) and bb.num_labels == 6
    gates = Gates.from_pretrained(tmp_path / "m" / "gates", backbone=bb)
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert gates.metrics == metrics and metrics["gates_training"]["train_config"]["steps"] == 10
    Explainer(bb, gates)  # fits


def test_recipe_rejects_unknown_name(tmp_path):
    with pytest.raises(SystemExit):
        recipes.main(["cifar", "--out", str(tmp_path)])


def test_recipe_reuses_its_work_folder(tmp_path, monkeypatch):
    """``build(work=DIR)`` twice: the second gate run replaces the first one's files in the scratch folder."""
    monkeypatch.setitem(recipes.RECIPES, "toy", replace(recipes.TOY, steps=2))
    monkeypatch.setitem(recipes.GATE_CONFIGS, "toy", dict(steps=2, eval_interval=2, checkpoint_interval=2, val_size=20))
    work = tmp_path / "work"
    for out in ("a", "b"):
        m = recipes.build("toy", tmp_path / out, work=work, progress=False)
        assert m["gates_training"]["train_config"]["steps"] == 2
        assert (work / "checkpoint.safetensors").is_file() and (tmp_path / out / "gates").is_dir()
