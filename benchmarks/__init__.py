"""blockdrv vs qemu-img benchmark suite (see run.py)."""
