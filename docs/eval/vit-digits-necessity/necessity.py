"""Why the path misses the most-relevant-first curves under mean replacement: is the single most
necessary patch at the top of each ranking? Writes necessity.json beside this file.

For each of the 300 test digits, each patch alone is replaced by the image's mean patch (the
mean-replacement test's replacement) and the drop in P(original class) recorded; the best pair is found
by trying all 120 pairs. Then each method's ranking is read against that.
Run: python docs/eval/vit-digits-necessity/necessity.py (about a minute on 2 CPU cores).
"""

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from vdm_engine import Explainer, Gates
from vdm_engine.attribution import get_method
from vdm_engine.data import digits_split
from vdm_engine.evaluation import perturb_pixels, replacement_pixels, spearman
from vdm_engine.models import embedded_levels_dir

torch.manual_seed(0)
single = Explainer.from_pretrained("vit-digits").eval()
bb = single.backbone
path = Explainer(bb, Gates.from_pretrained(embedded_levels_dir("vit-digits"), bb, source="shipped")).eval()
pv = bb.preprocess(digits_split("test")[0])
M, N = len(pv), bb.num_patches
rep = replacement_pixels(pv, "mean", bb.image_spec, range(M))
rows = torch.arange(M)


@torch.no_grad()
def p_class(keep: torch.Tensor) -> torch.Tensor:
    """P(original class) with the patches where keep (M, N) is 0 replaced by the image's mean patch."""
    return bb(perturb_pixels(pv, rep, keep.unsqueeze(1).float(), bb.patch_size)).softmax(-1)[rows, y]


with torch.no_grad():
    y = bb(pv).argmax(-1)
    e_path, e_single = path.explain(pv), single.explain(pv)
p0 = p_class(torch.ones(M, N))
drop = torch.stack([p0 - p_class(torch.ones(M, N).index_fill_(1, torch.tensor([j]), 0)) for j in range(N)], 1)
best_pair = torch.stack([p0 - p_class(torch.ones(M, N).index_fill_(1, torch.tensor([a, b]), 0))
                         for a, b in itertools.combinations(range(N), 2)], 1).max(1).values
scores = {"diffmask-path": e_path.patch_rank, "diffmask": e_single.patch_mask,
          **{m: get_method(m, backbone=bb)(pv, y).detach().float() for m in ("chefer", "ig", "rollout")}}
best = drop.argmax(1, keepdim=True)
level = e_path.patch_rank.floor()
out = {"images": M, "p_class": float(p0.mean()), "oracle_best_single_drop": float(drop.max(1).values.mean()),
       "oracle_best_pair_drop": float(best_pair.mean()),
       "best_single_in_path_top_level": float((level.gather(1, best) == level.max(1, keepdim=True).values).float().mean()),
       "path_top_level_size": float((level == level.max(1, keepdim=True).values).float().sum(1).mean()),
       "methods": {}}
for m, s in scores.items():
    top2 = s.topk(2, dim=1).indices
    out["methods"][m] = {
        "top1_is_best_single": float((s.argmax(1, keepdim=True) == best).float().mean()),
        "drop_of_top1": float(drop.gather(1, s.argmax(1, keepdim=True)).mean()),
        "drop_of_top2_together": float((p0 - p_class(torch.ones(M, N).scatter_(1, top2, 0))).mean()),
        "ranked_above_best_single": float((s > s.gather(1, best)).sum(1).float().mean()),
        "spearman_with_single_drop": float(np.nanmean(spearman(s, drop))),
    }
(Path(__file__).parent / "necessity.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
