"""osteonode: opportunistic bone-health screening DICOM node."""

__version__ = "0.1.0"
