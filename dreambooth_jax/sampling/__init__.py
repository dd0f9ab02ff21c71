"""Noise schedules and the jitted batch sampler."""
