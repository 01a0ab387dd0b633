"""Training errors the CLI reports as one line (the run's record says `failed`)."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""
