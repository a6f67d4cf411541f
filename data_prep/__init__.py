"""Build webdataset shards (with sizes.json and _stats.json) from manifests, folders and bundled sets."""
