"""Analysis of AdaLoRA run folders: loaders, plots, tables, report (reads files only)."""
