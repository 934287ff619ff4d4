"""Files on disk: atomic, owned, locked writes (fsio) and checkpoints (save, load, resume)."""
