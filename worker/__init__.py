"""Celery app and thin tasks around the plain pipeline functions in :mod:`osteonode`."""
