"""Datasets (built-in and user files; classification, text, instruction and chat), tokenization, and seeded partitioners.

A run gets its data through :func:`load_run_data` (load + split among clients) and
:func:`tokenize_dataset` (tensors for the run's model).
"""

from dpeft.data.datasets import TextDataset, load_dataset, load_text_file
from dpeft.data.partition import column_partition, dirichlet_partition, iid_partition, partition
from dpeft.data.run_data import RunData, load_client_file, load_run_data, split_among, tokenize_dataset
from dpeft.data.tokenize import TokenizedData, tokenize

__all__ = [
    "RunData",
    "TextDataset",
    "TokenizedData",
    "column_partition",
    "dirichlet_partition",
    "iid_partition",
    "load_client_file",
    "load_dataset",
    "load_run_data",
    "load_text_file",
    "partition",
    "split_among",
    "tokenize",
    "tokenize_dataset",
]
