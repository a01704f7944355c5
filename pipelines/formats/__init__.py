"""Dataset formats on storage: COCO json, Parquet shards + manifest, preparing shards, synthetic shapes."""
