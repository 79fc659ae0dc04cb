"""Reports: pure functions of run directories on disk -> HTML (`reports.html`, charts in `reports.charts`)."""

__all__: list[str] = []
