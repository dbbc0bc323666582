"""normlab.data: MNIST and Fashion-MNIST, verified by SHA-256, fetched offline if need be.

    from normlab.data import load_dataset
    ds = load_dataset("mnist")          # uint8 (60000, 28, 28) images, int64 labels
"""

from normlab.data.dataset import Dataset, load_dataset
from normlab.data.sources import DATASETS, DataUnavailableError, data_dir

__all__ = ["DATASETS", "DataUnavailableError", "Dataset", "data_dir", "load_dataset"]
