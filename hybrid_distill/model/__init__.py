"""The method, free of distributed code: backbone adapters and teacher weights, q/k capture, the student,
redundant-token masking, the two loss terms and the task that owns them all (``task.HybridDistillTask``)."""
