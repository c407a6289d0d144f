"""The mechanism: state, effects and their handlers, the step driver, composition."""
