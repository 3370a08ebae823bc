"""Datasets: the built-in benchmarks, any CSV table and the paper's DIR benchmarks (AgeDB,
IMDB-WIKI, NYUD2), all listed in one registry (:mod:`balanced_sam.data.registry`)."""

from balanced_sam.data.base import BenchData
from balanced_sam.data.registry import (
    DATASETS,
    REGISTRY,
    DatasetEntry,
    DataSplits,
    Recipe,
    build_model,
    get_dataset,
    get_entry,
    load_data,
    register,
    register_dataset,
)
from balanced_sam.data.scaling import TargetScaler

__all__ = ["BenchData", "DATASETS", "REGISTRY", "DatasetEntry", "DataSplits", "Recipe",
           "TargetScaler", "build_model", "get_dataset", "get_entry", "load_data", "register",
           "register_dataset"]
