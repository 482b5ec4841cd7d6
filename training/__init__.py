"""Gate training (Lagrangian DiffMask), data sources, distributed runs and the demo-model recipes."""

from .config import TrainConfig
from .loop import TrainResult, new_gates, train_gates
from .rundir import check_run_dir, resume_config
from .run import train
from .step import TrainingDiverged, TrainState, train_step

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "check_run_dir",
    "new_gates",
    "resume_config",
    "train",
    "train_gates",
    "train_step",
]
