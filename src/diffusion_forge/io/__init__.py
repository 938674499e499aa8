"""Files on disk: the one atomic writer and cache folder, checkpoints, run folders."""
