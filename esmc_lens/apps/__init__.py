"""What users run: the CLI, the demo, the notebooks' workbench, widgets and the benchmark."""
