"""Datasets: the built-in benchmarks, any CSV table and the paper's DIR benchmarks (AgeDB,
IMDB-WIKI, NYUD2), all listed in one registry (:mod:`balanced_sam.data.registry`)."""

from balanced_sam.data.base import BenchData
from balanced_sam.data.registry import (
    REGISTRY,
    DatasetEntry,
    DataSplits,
    Recipe,
    build_model,
    get_entry,
    load_data,
    register,
    table_loader,
)
from balanced_sam.data.scaling import TargetScaler

__all__ = ["BenchData", "REGISTRY", "DatasetEntry", "DataSplits", "Recipe", "TargetScaler",
           "build_model", "get_entry", "load_data", "register", "table_loader"]
