"""Performance model: hardware and model catalogs, a roofline step model, disaggregation, calibration (pure)."""
