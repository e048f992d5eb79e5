"""Image data a user brings (folders, Parquet), corruptions for shifted domains, demo tasks.

datasets.py: loaders yielding (image, label or -1, domain) · shifts.py: batched torch
corruptions · demo.py: offline demo tasks in the DomainBed layout.
"""
