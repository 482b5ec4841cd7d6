import torch, numpy as np, json
torch.set_num_threads(1)
from vdm_engine import Explainer
from vdm_engine.data import digits_split
from vdm_engine.evaluation import spearman, patch_intensity, randomised_backbone
ex = Explainer.from_pretrained("vit-digits").eval(); bb = ex.backbone
x, y = digits_split("test"); pv = bb.preprocess(x)
with torch.no_grad():
    _, h = bb.hidden_states(pv)
    lk = ex.gates.log_keep_prob(h)[:, :, 1:]  # (B, S, N)
    final = lk.sum(1)
    inten = patch_intensity(pv, bb.patch_size); contrast = patch_intensity(pv, bb.patch_size, "std")
    out = {"depths": lk.shape[1]}
    out["spearman_final_vs_intensity"] = float(np.nanmean(spearman(final, inten)))
    out["spearman_final_vs_contrast"] = float(np.nanmean(spearman(final, contrast)))
    out["per_depth_spearman_with_final"] = [float(np.nanmean(spearman(lk[:, i], final))) for i in range(lk.shape[1])]
    out["per_depth_spearman_with_intensity"] = [float(np.nanmean(spearman(lk[:, i], inten))) for i in range(lk.shape[1])]
    out["per_depth_mean_log_keep"] = [float(lk[:, i].mean()) for i in range(lk.shape[1])]
    out["per_depth_var_log_keep_across_patches"] = [float(lk[:, i].var(1).mean()) for i in range(lk.shape[1])]
    rb = randomised_backbone(bb, bb.num_layers, seed=0)
    _, hr = rb.hidden_states(pv)
    lkr = ex.gates.log_keep_prob(hr)[:, :, 1:]
    out["fully_randomised_final_vs_trained"] = float(np.nanmean(spearman(lkr.sum(1), final)))
    out["fully_randomised_depth0_equal"] = float((lkr[:, 0] - lk[:, 0]).abs().max())
    out["hidden_state0_equal_after_randomisation"] = float((hr[0] - h[0]).abs().max())
print(json.dumps(out, indent=1))
