"""CIFAR-10 course helpers."""
