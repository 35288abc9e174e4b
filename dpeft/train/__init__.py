"""Local training and evaluation loops (plain PyTorch)."""

from dpeft.train.loop import LocalResult, TrainingStopped, batch_schedule, evaluate, local_train, make_optimizer, task_seed

__all__ = ["LocalResult", "TrainingStopped", "batch_schedule", "evaluate", "local_train", "make_optimizer", "task_seed"]
