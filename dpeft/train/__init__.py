"""Local training and evaluation loops (plain PyTorch)."""

from dpeft.train.loop import LocalResult, batch_schedule, evaluate, local_train, make_optimizer, task_seed

__all__ = ["LocalResult", "batch_schedule", "evaluate", "local_train", "make_optimizer", "task_seed"]
