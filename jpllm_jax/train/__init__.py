"""Training: the LLM-jp optimiser recipe, the sharded train step, FLOP accounting, checkpoints and the loop."""
