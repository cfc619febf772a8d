"""The fast training path: aligned tensors stored once, read by a torch ``Dataset``.

``prepare_cohort`` ingests what is not cached yet, aligns every row once into the
:class:`TensorStore` and writes a manifest index; :class:`CohortDataset` then reads only
that index and the store, so a training epoch never touches a source file.

Example:
    >>> from meddx.data import prepare_cohort
    >>> if __name__ == "__main__":  # ingest workers are spawned  # doctest: +SKIP
    ...     prepared = prepare_cohort("sample_data/manifest.csv")
    ...     dataset = prepared.dataset(split="train")
    ...     batch = dataset.collate([dataset[0], dataset[1]])
"""

from meddx.cache import TensorStore, aligner_hash, default_cache_dir, row_key
from meddx.data.dataset import CohortDataset
from meddx.data.index import CohortIndex, IndexRow
from meddx.data.prepare import PreparedCohort, prepare_cohort

__all__ = [
    "CohortDataset",
    "CohortIndex",
    "IndexRow",
    "PreparedCohort",
    "TensorStore",
    "aligner_hash",
    "default_cache_dir",
    "prepare_cohort",
    "row_key",
]
