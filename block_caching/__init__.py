"""Block Caching (Wimbauer et al., CVPR 2024): profile, schedule, cache, forecast, scale-shift correction."""
