class RuntimeInputError(ValueError):
    """A problem with the user's input or model folder: printed as one line, exit code 2."""
