"""Training: the Accelerator and the process layout (dist), optimiser, checkpoints, the loop."""
