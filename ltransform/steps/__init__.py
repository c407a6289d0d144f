"""Step transforms: functions that take a step and return one (precision, accumulate, clip)."""
