"""How training and evaluation read the data: datamodules, batches, streamed shards, prepared data."""

from convcg_cli.data.loading.batches import (
    ItemIdDropout,
    SequentialBatches,
    ShardedBatches,
    ShuffledBatches,
)
from convcg_cli.data.loading.datamodule_base import NON_CONTENT_OPTIONS, DataModuleBase, content_options
from convcg_cli.data.loading.datamodules import ImpressionDataModule, InMemoryDataModule, StreamedDataModule
from convcg_cli.data.loading.prepared import PreparedDataCache, prepared_key

__all__ = [
    "NON_CONTENT_OPTIONS",
    "DataModuleBase",
    "ImpressionDataModule",
    "InMemoryDataModule",
    "ItemIdDropout",
    "PreparedDataCache",
    "SequentialBatches",
    "ShardedBatches",
    "ShuffledBatches",
    "StreamedDataModule",
    "content_options",
    "prepared_key",
]
