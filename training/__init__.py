"""Gate training (Lagrangian DiffMask), data sources, distributed runs and the demo-model recipes."""

from .config import TrainConfig
from .loop import TrainingDiverged, TrainResult, new_gates, train_gates

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "new_gates", "train_gates"]
