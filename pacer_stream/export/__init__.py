"""What goes into the output folder besides the weights."""
