"""PedicleScrewPose core: Slicer-independent pedicle screw detection and pose from C-arm X-rays."""

__version__ = "0.1.0"
