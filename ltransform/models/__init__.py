"""Model transforms: functions that take a model and return one, before the optimizer is built."""
