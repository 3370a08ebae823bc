"""Datasets: the built-in benchmarks and the paper's DIR benchmarks (AgeDB, IMDB-WIKI, NYUD2)."""

from balanced_sam.data.base import DATASETS, BenchData, get_dataset, register_dataset

__all__ = ["BenchData", "DATASETS", "get_dataset", "register_dataset"]
