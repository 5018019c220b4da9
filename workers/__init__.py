"""Training in the background: RQ jobs that fine-tune MaskCLIP+ students, and the worker command."""
