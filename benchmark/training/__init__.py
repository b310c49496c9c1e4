"""The cell's training loop and everything it calls."""
