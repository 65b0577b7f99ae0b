"""Datasets: records, readers, the synthetic shapes set, image loading and the DataModule."""
