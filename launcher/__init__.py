"""The launcher: turns a training spec into a Kubernetes Job and follows it."""
