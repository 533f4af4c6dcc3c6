"""A run on disk: its checkpoint folder (folder.py) and its model weights (weights.py).

Training, evaluation and the Hugging Face conversion all read runs through this package.
"""
