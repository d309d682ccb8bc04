"""Data: batches as pure functions of (seed, step) from byte corpora or the synthetic clusters task.

`build_data(cfg, seed)` builds the source named by `cfg.name`; `data_configs()` lists the typed configs.
"""

from moe.data import clusters, streams  # noqa: F401  (importing a source module registers it)
from moe.data.sources import Batch, DataSource, build_data, data_configs
from moe.data.streams import VOCAB_SIZE

__all__ = ["VOCAB_SIZE", "Batch", "DataSource", "build_data", "data_configs"]
