"""The files of a run folder, named once (no torch here: the CLI checks a run
folder before it imports any)."""
TRAINABLE, LAST, BEST = "trainable.pt", "checkpoints/last.ckpt", "checkpoints/best.ckpt"
