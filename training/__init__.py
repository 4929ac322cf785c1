"""lipcert training: budgeted training on real data, certified evaluation, export, model store.

``python -m training --method aol --size xs --dataset fashion-mnist --budget 5m`` (see
``docs/training.md``). Library entry points:

- :func:`training.loop.train` — one run from a :class:`training.config.TrainConfig`.
- :func:`data.load_dataset` — datasets as in-memory uint8 tensors.
- :func:`training.loss.offset_cross_entropy` — the loss.
- :func:`certify.artifact.store.save_to_store` / ``list_store_models`` — BentoML.
"""

from certify.artifact.store import list_store_models, save_to_store
from data import DATASETS, Dataset, DatasetUnavailableError, load_dataset
from training.config import TrainConfig, parse_duration, parse_methods
from training.loop import RunResult, train
from training.loss import offset_cross_entropy, one_cycle_lr

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetUnavailableError",
    "RunResult",
    "TrainConfig",
    "list_store_models",
    "load_dataset",
    "offset_cross_entropy",
    "one_cycle_lr",
    "parse_duration",
    "parse_methods",
    "save_to_store",
    "train",
]
