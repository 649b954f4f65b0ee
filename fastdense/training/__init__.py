"""The training loop's parts (see fastdense.train for the trainer itself)."""
