"""Release builds: the packaged grounder as a named DVC experiment
(``python -m release.pretrained``)."""
