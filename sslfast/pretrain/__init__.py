"""Pretraining: self-supervised methods, data, kNN evaluation and the command line."""
