"""Datasets, two-view transforms and the LightningDataModule."""
