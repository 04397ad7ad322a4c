"""Evaluation of pre-trained encoders: feature extraction and kNN protocols."""
