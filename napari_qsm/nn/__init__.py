"""Deep dipole inversion: QSMInvNet / QSMInvNet+ (DSBN), training, inference (headless torch)."""
