"""One module per model family: how each bench model is built and evaluated against ground truth."""
