"""Datasets (built-in and user files), tokenization, and seeded partitioners."""

from dpeft.data.datasets import TextDataset, load_dataset, load_text_file
from dpeft.data.partition import dirichlet_partition, iid_partition, partition
from dpeft.data.tokenize import TokenizedData, tokenize

__all__ = [
    "TextDataset",
    "TokenizedData",
    "dirichlet_partition",
    "iid_partition",
    "load_dataset",
    "load_text_file",
    "partition",
    "tokenize",
]
