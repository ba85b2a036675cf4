"""Command lines of the ``birefnet`` tool that are not pipeline stages (predict, export, convert-upstream, promote)."""
