"""The error of the evaluation tools that the user can fix."""


class EvaluationError(ValueError):
    """A problem the user can fix (a sample dump of other weights or arguments, a reference or feature extractor that
    cannot be fetched offline, a pipeline whose samples are not finite); the scripts report it without a traceback."""
