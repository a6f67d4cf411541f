"""matplotlib for writing PNG files, with no display."""

from types import ModuleType


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend."""
    # Imported here: matplotlib takes a second to import, and the backend must be chosen before pyplot
    # loads; only the end of a run and the evaluation reports draw.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt
