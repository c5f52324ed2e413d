"""Datasets: scanning image folders and manifests, loading images, splits and transforms."""
