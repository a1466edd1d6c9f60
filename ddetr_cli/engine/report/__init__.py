"""What runs report: progress on the terminal (``progress``), the metrics log
with its plot (``metrics``) and annotated prediction images (``annotated``).
Imports nothing from the loops or the runs."""
