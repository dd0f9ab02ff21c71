"""The train step, optimizer, checkpoints, memory plan, metrics and the run loop."""
