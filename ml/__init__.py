"""Malaria cell classifier: VGG19 model, preprocessing, Grad-CAM, training and evaluation.

This package must stay free of Django imports so it can be trained, evaluated and benchmarked
on its own.
"""
