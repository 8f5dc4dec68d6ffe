"""The original theano_alexnet's released parameters and the converter to our checkpoints (convert.py)."""
