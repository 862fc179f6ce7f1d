"""Training from scribbles: the head fit, the context net, the optimiser and the scribble checks."""
