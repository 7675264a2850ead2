"""Frozen bases: cards (registry), fetching (pull), loading with taps (frozen), LoRA patches."""
