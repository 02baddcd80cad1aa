"""Bone-status classification: threshold rules and (later) trained models."""
