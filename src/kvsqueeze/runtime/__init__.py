"""Runtime: the only part of kvsqueeze that touches the model (routing its attention, the cache container with
its compression schedule, prefill / decode loops, calibration passes)."""
