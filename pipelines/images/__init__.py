"""Images without Ray: decode, resize, flip, normalize, collate (run in Ray tasks, DataLoaders, GPU boxes)."""
