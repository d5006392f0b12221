"""What outlives a run: final weights in canonical form (weights.py); sharded checkpoints come here too."""
