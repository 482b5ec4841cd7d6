"""``TrainConfig``: every knob of the Lagrangian DiffMask gate training, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vdm_engine._io import dataclass_from_dict

from .replacement import replacement_kinds

__all__ = ["TrainConfig", "PRECISIONS", "DEPTH_SAMPLING", "L0_FORMS", "OBJECTIVES"]

PRECISIONS = ("fp32", "bf16", "fp16")
DEPTH_SAMPLING = ("uniform", "adaptive")
L0_FORMS = ("prob", "log")
OBJECTIVES = ("keep", "delete")


@dataclass(frozen=True)
class TrainConfig:
    """Gate training settings (defaults tuned for the small embedded ViTs; see ``recipes``).

    The objective per step: pick a depth k, sample hard-concrete gates aggregated up to k, run the
    masked pass and minimise ``alpha_k * (KL(p_orig || p_masked) - eps) + L0_k`` over the probes
    and the placeholder while maximising it over ``alpha_k`` (clamped to ``[0, alpha_max]``).

    Attributes:
        steps: optimisation steps.
        batch_size: images per step (per rank under ``torchrun``).
        eps: KL budget of the constraint.
        alpha_init, alpha_max, lr_alpha: Lagrange multipliers (one per depth, RMSprop ascent).
        lr_probe: learning rate of the probes (Adam) after ``warmup_steps`` of linear warm-up.
        lr_placeholder: learning rate of the placeholder vector (Adam).
        mul, add_init, probe_size, beta: gate maths (see ``GateConfig``); used when the gates are
            created by training (not when continuing given gates).
        l0: ``"prob"`` penalises the mean keep probability, ``"log"`` its log (the issue's form).
            The log form's gradient never vanishes for dropped patches and drives their probes into
            tanh saturation; the probability form is bounded.
        depth_sampling: ``"uniform"`` over k = 0..L+1, or ``"adaptive"`` (weights proportional to
            alpha_k plus a floor, so depths whose constraint is still active are trained more).
        last_depth_weight: extra sampling weight of the last depth (the mask explanations use).
        eval_interval: validate (hard mask, deterministic gates) every this many steps and at the end.
        checkpoint_interval: write the resumable checkpoint every this many steps and at the end.
        val_size: held-out images used for validation.
        eps_valid: KL bound (hard mask) a checkpoint must meet to be selected as best.
        agreement: fraction of validation images whose masked prediction must agree.
        threshold: keep probability above which the hard mask keeps a patch.
        seed: seeds data order, depth choice and gate noise.
        precision: autocast dtype of the frozen ViT on CUDA (``fp32`` = no autocast).
        grad_clip: max gradient norm of probes and placeholder (0 = off).
        replacement: what a dropped patch becomes during training: ``placeholder`` (the gates'
            placeholder, as in explanations), or kinds joined by ``+`` (``placeholder``, ``zeros``,
            ``mean``, ``noise``), row b of a batch taking kind b mod their count (see ``replacement``).
            Validation and checkpoint selection always use the placeholder.
        objective: ``"keep"`` (DiffMask: the fewest patches kept with ``KL <= eps``) or ``"delete"``
            (a necessity level: the fewest patches removed with ``KL >= eps``). With ``"delete"`` the gate
            value g is read as "removed": the masked pass keeps ``1 - g``, the L0 term penalises mean(g)
            and the loss is ``alpha_k * (eps - KL) + L0_k``; a checkpoint qualifies when its hard mask
            (remove the patches with g > ``threshold``) gives ``KL >= eps_valid`` and agreement
            ``<= agreement``, and the one removing the fewest patches (then the highest KL) is selected.
    """

    steps: int = 3000
    batch_size: int = 64
    eps: float = 0.1
    alpha_init: float = 20.0
    alpha_max: float = 200.0
    lr_alpha: float = 0.3
    lr_probe: float = 1e-3
    warmup_steps: int = 100
    lr_placeholder: float = 1e-3
    mul: float = 10.0
    add_init: float = 5.0
    probe_size: int | None = None
    beta: float = 0.2
    l0: str = "prob"
    depth_sampling: str = "adaptive"
    last_depth_weight: float = 1.0
    eval_interval: int = 250
    checkpoint_interval: int = 250
    val_size: int = 200
    eps_valid: float = 0.15
    agreement: float = 0.95
    threshold: float = 0.5
    seed: int = 0
    precision: str = "fp32"
    grad_clip: float = 1.0
    replacement: str = "placeholder"
    objective: str = "keep"

    def __post_init__(self):
        def positive(name, strict=True):
            v = getattr(self, name)
            if not (v > 0 if strict else v >= 0):
                raise ValueError(f"TrainConfig.{name} must be {'> 0' if strict else '>= 0'}, got {v}")

        for name in ("steps", "batch_size", "eval_interval", "checkpoint_interval", "val_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("eps", "lr_alpha", "lr_probe", "lr_placeholder", "mul", "beta", "alpha_max"):
            positive(name)
        for name in ("alpha_init", "warmup_steps", "eps_valid", "grad_clip", "last_depth_weight"):
            positive(name, strict=False)
        if self.alpha_init > self.alpha_max:
            raise ValueError(f"TrainConfig.alpha_init ({self.alpha_init}) must be <= alpha_max ({self.alpha_max})")
        if not 0 < self.agreement <= 1:
            raise ValueError(f"TrainConfig.agreement must be in (0, 1], got {self.agreement}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"TrainConfig.threshold must be in (0, 1), got {self.threshold}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.depth_sampling not in DEPTH_SAMPLING:
            raise ValueError(f"TrainConfig.depth_sampling must be one of {DEPTH_SAMPLING}, got {self.depth_sampling!r}")
        if self.l0 not in L0_FORMS:
            raise ValueError(f"TrainConfig.l0 must be one of {L0_FORMS}, got {self.l0!r}")
        try:
            replacement_kinds(self.replacement)
        except (ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"TrainConfig.{e}") from None
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.probe_size is not None and self.probe_size < 1:
            raise ValueError(f"TrainConfig.probe_size must be >= 1 or None, got {self.probe_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, d)
