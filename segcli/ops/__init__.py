"""Pure tensor math: rotary positions, attention over [memory; segment], linear memory."""
