"""Measurements on the segmented vertebrae."""
