"""Training input on Ray Data: streaming datasets of prepared shards or COCO layouts, repeat-factor sampling."""
