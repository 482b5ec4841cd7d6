"""``vdm-eval`` on the tiny random ViT with toy data (its 4x4 grid matches the toy ground truth)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vdm_engine.cli.eval import main


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_eval_writes_results_table_and_figures(tmp_path, model_and_gates, capsys):
    pytest.importorskip("matplotlib")
    model, gates = model_and_gates
    methods = "diffmask,rollout,gradcam,random"
    try:
        import captum  # noqa: F401

        methods += ",ig"
    except ImportError:
        pass
    out = tmp_path / "ev"
    rc = main(["--model", model, "--gates", gates, "--data", "toy", "--methods", methods, "--n", "7",
               "--batch-size", "3", "--ig-steps", "4", "--out", str(out), "--seed", "3", "--retrain-steps", "0",
               "--randomise-blocks", "1"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 7 and res["model"] == model and res["data"] == "toy" and res["seed"] == 3
    assert sorted(res["methods"]) == sorted(methods.split(","))
    for m, e in res["methods"].items():
        for rp in ("noise", "mean"):
            for o in ("positive", "negative"):
                assert len(e[rp][o]["prob"]) == 11 and isinstance(e[rp][o]["auc_prob"], float)
        assert "topk" in e["localisation"]
        assert len(e["insertion_deletion"]["noise"]["deletion"]["prob"]) == 17 and "road" in e
        assert {"sparseness", "complexity", "intensity"} <= set(e)
    assert "own" in res["methods"]["diffmask"]["localisation"]
    assert res["randomisation"]["ks"] == [1] and set(res["randomisation"]["methods"]) == set(methods.split(","))
    md = (out / "results.md").read_text()
    assert "| diffmask |" in md and "## Replacement: mean" in md and "Localisation" in md
    assert "ROAD MoRF / LeRF" in md and "Model-randomisation" in md
    level = res["versus_best_baseline"]["diffmask"]
    assert len(level) == 10 and {r["best"] for r in level} <= set(methods.split(",")) - {"diffmask", "random"}
    assert "## DiffMask against the best baseline of each curve" in md
    for name in ("curves_noise.png", "curves_mean.png", "curves_road.png", "examples.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    stdout = capsys.readouterr().out
    met = sum(r["met"] for r in level)
    assert "wrote" in stdout and f"diffmask level with the best baseline on {met} of 10 curves" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "diffmask,lime"], "unknown attribution method"),
        (["--data", "mnist"], "unknown data source"),
        (["--n", "0"], "--n must be >= 1"),
        (["--replacements", "blur"], "replacements"),
        (["--metrics", "road,lime"], "unknown metric 'lime'"),
        (["--randomise-blocks", "a,b"], "--randomise-blocks must be comma-separated integers"),
        (["--retrain-steps", "-1"], "--retrain-steps must be >= 0"),
    ],
)
def test_eval_usage_errors(tmp_path, model_and_gates, capsys, args, message):
    model, gates = model_and_gates
    base = {"--model": model, "--gates": gates, "--data": "toy", "--methods": "random", "--n": "2",
            "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    rc = main([x for kv in base.items() for x in kv] + ["--no-plots"])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("vdm-eval:")]
    assert rc == 2 and "Traceback" not in err and len(ours) == 1 and message in ours[0]


def test_eval_imagefolder_without_plots(tmp_path, model_and_gates, capsys):
    import numpy as np

    model, gates = model_and_gates
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        Image.fromarray(rng.integers(0, 256, size=(40 + i, 36, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "ev"
    rc = main(["--model", model, "--gates", gates, "--data", f"imagefolder:{folder}", "--methods", "diffmask,random",
               "--n", "10", "--replacements", "mean", "--no-plots", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 3 and list(res["config"]["replacements"]) == ["mean"]
    assert "localisation" not in res["methods"]["diffmask"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
